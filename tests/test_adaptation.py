# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The adaptation baselines and measurement helpers that recipes rely on."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from peft_vision_ext.adaptation import (
    base_parameter_count,
    count_parameters,
    prepare_for_adaptation,
    update_size_bytes,
)

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
