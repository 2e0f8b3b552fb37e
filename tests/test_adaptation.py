# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The adaptation baselines (``adaptation.py``) and measurement helpers (``analysis/measure.py``) that recipes rely
on."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from peft_vision_ext.adaptation import prepare_for_adaptation
from peft_vision_ext.analysis import base_parameter_count, count_parameters, update_size_bytes

from tiny_models import make_unet


def test_methods_train_what_they_should():
    base_total = count_parameters(make_unet("test_resnet"))[1]
    full = prepare_for_adaptation(make_unet("test_resnet"), "full")
    assert count_parameters(full) == (base_total, base_total)
    decoder = prepare_for_adaptation(make_unet("test_resnet"), "decoder")
    trainable = {n for n, p in decoder.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("encoder.") for n in trainable)
    for method in ("conv_adapter", "bn_adapter"):
        model = prepare_for_adaptation(make_unet("test_resnet"), method)
        assert isinstance(model, PeftModel)
        assert base_parameter_count(model) == base_total
    with_head = prepare_for_adaptation(make_unet("test_resnet"), "conv_adapter", modules_to_save=["segmentation_head"])
    assert base_parameter_count(with_head) == base_total


def test_decoder_tuning_keeps_encoder_batchnorm_statistics():
    model = prepare_for_adaptation(make_unet("test_resnet"), "decoder").train()
    encoder_stats = {n: b.clone() for n, b in model.encoder.named_buffers() if "running_" in n}
    decoder_stats = {n: b.clone() for n, b in model.decoder.named_buffers() if "running_" in n}
    model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randint(0, 3, (2, 32, 32))).loss.backward()
    assert all(torch.equal(b, encoder_stats[n]) for n, b in model.encoder.named_buffers() if "running_" in n)
    assert any(not torch.equal(b, decoder_stats[n]) for n, b in model.decoder.named_buffers() if "running_" in n)


def test_update_sizes_order_the_methods():
    sizes = {
        m: update_size_bytes(prepare_for_adaptation(make_unet("test_resnet"), m))
        for m in ("full", "decoder", "conv_adapter", "bn_adapter")
    }
    assert sizes["bn_adapter"] < sizes["conv_adapter"] < sizes["full"]
    assert sizes["decoder"] < sizes["full"]


def test_unknown_method():
    with pytest.raises(ValueError, match=r"`method` must be one of .* got 'lora'"):
        prepare_for_adaptation(make_unet("test_resnet"), "lora")


def test_mask2former_methods_train_what_they_should():
    from peft_vision_ext.adaptation import MASK2FORMER_ADAPTATION_METHODS, prepare_mask2former_for_adaptation
    from peft_vision_ext.models import mask2former_parts

    from tiny_models import make_mask2former

    base_total = count_parameters(make_mask2former())[1]
    trained = {}
    for method in MASK2FORMER_ADAPTATION_METHODS:
        settings = {
            "seq_adapter_1": {"adapter_dim": 4},
            "seq_adapter_2": {"adapter_dim": 4},
            "seq_adapter_3": {"adapter_dim": 4},
            "deform_lora": {"r": 2},
            "deform_lora+seq_adapter": {"r": 2, "adapter_dim": 4, "adapters_per_block": 2},
        }.get(method, {})
        model = prepare_mask2former_for_adaptation(make_mask2former(), method, **settings)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        trained[method] = count_parameters(model)[0]
        assert base_parameter_count(model) == base_total, method
        if method in ("zero_shot", "decoder", "full"):
            assert not isinstance(model, PeftModel)
            continue
        assert isinstance(model, PeftModel)
        # adapters (iseg_ prefix) and the class head copy train, nothing of the base model
        assert names and all(".iseg_" in n or "class_predictor.modules_to_save" in n for n in names), method
        assert any("class_predictor.modules_to_save" in n for n in names)
    assert trained["zero_shot"] == 0 and trained["full"] == base_total
    decoder = prepare_mask2former_for_adaptation(make_mask2former(), "decoder")
    backbone = mask2former_parts(decoder)["backbone"][0]
    assert not any(p.requires_grad for p in backbone.parameters())
    assert trained["decoder"] == base_total - sum(p.numel() for p in backbone.parameters())
    assert trained["seq_adapter_1"] < trained["seq_adapter_2"] < trained["seq_adapter_3"] < trained["decoder"]
    assert trained["deform_lora"] < trained["deform_lora+seq_adapter"]


def test_mask2former_adaptation_bad_input():
    from peft_vision_ext.adaptation import prepare_mask2former_for_adaptation

    from tiny_models import make_mask2former, make_unet

    with pytest.raises(ValueError, match=r"`method` must be one of .* got 'lora'"):
        prepare_mask2former_for_adaptation(make_mask2former(), "lora")
    with pytest.raises(ValueError, match="takes no PEFT settings"):
        prepare_mask2former_for_adaptation(make_mask2former(), "full", lora_alpha=4)
    with pytest.raises(ValueError, match="takes no PEFT settings"):
        prepare_mask2former_for_adaptation(make_mask2former(), "decoder", adapter_dim=8)
    with pytest.raises(ValueError, match="has no LoRA"):
        prepare_mask2former_for_adaptation(make_mask2former(), "seq_adapter_2", r=4)
    with pytest.raises(ValueError, match="is LoRA alone"):
        prepare_mask2former_for_adaptation(make_mask2former(), "deform_lora", adapters_per_block=2)
    with pytest.raises(TypeError, match="not a Mask2FormerForUniversalSegmentation"):
        prepare_mask2former_for_adaptation(make_unet("test_resnet"), "decoder")


def test_measurement_helpers_are_still_importable_from_adaptation():
    """Older code imports the measurement helpers from ``adaptation``; they are the ones of ``analysis.measure``."""
    from peft_vision_ext import adaptation
    from peft_vision_ext.analysis import measure

    for name in measure.__all__:
        assert getattr(adaptation, name) is getattr(measure, name), name
