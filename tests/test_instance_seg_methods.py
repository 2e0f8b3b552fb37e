# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Seed 001 methods (deformable-attention LoRA, sequential adapters): structure detection on two model families,
the nn.MultiheadAttention handling, the combination of both methods, and bad input. The shared matrix
(`testing_common.MATRIX`) covers identity at init, disabling, merge exactness, training and fresh-process save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_vision_ext  # noqa: F401
from peft_vision_ext import DeformableLoRAConfig, SeqAdapterConfig
from peft_vision_ext.tuners.deform_lora import LoraLinear, LoraMultiheadAttention, find_deformable_attention
from peft_vision_ext.tuners.seq_adapter import SeqAdapterLayer, find_blocks

from tiny_models import forward_logits, make_deformable_detr, make_mask2former, make_tiny_cnn, make_vit


def _layers(model, cls) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, cls)]


def test_deformable_attention_found_by_structure_in_two_families():
    m2f = find_deformable_attention(make_mask2former())
    assert m2f == [f"model.pixel_level_module.decoder.encoder.layers.{i}.self_attn" for i in range(2)]
    detr = find_deformable_attention(make_deformable_detr())
    assert detr == ["encoder.layers.0.self_attn", "decoder.layers.0.encoder_attn"]


def test_deformable_attention_found_whatever_the_class_is_called():
    class Renamed(nn.Module):  # the same projections under another class name
        def __init__(self):
            super().__init__()
            self.sampling_offsets = nn.Linear(8, 2 * 2 * 3 * 4)
            self.attention_weights = nn.Linear(8, 2 * 3 * 4)
            self.value_proj = nn.Linear(8, 8)
            self.output_proj = nn.Linear(8, 8)

    holder = nn.Sequential(Renamed(), nn.Linear(8, 8))
    assert find_deformable_attention(holder) == ["0"]
    broken = Renamed()
    broken.attention_weights = nn.Linear(8, 5)  # not half of sampling_offsets: not deformable attention
    assert find_deformable_attention(nn.Sequential(broken)) == []


def test_sequential_adapter_blocks_found_in_two_families():
    m2f = find_blocks(make_mask2former())
    swin = [n for n in m2f if ".swin." in n]
    pixel = [n for n in m2f if "pixel_level_module.decoder.encoder" in n]
    decoder = [n for n in m2f if "transformer_module.decoder.layers" in n]
    assert len(swin) == 4 and len(pixel) == 2 and len(decoder) == 2 and len(m2f) == 8
    assert m2f[decoder[0]] == {"self_attn": "self_attn", "cross_attn": "cross_attn", "ffn": "fc2"}
    assert m2f[swin[0]] == {"self_attn": "attention", "ffn": "mlp"}
    detr = find_blocks(make_deformable_detr())
    assert detr["decoder.layers.0"] == {"self_attn": "self_attn", "cross_attn": "encoder_attn", "ffn": "mlp"}
    assert detr["encoder.layers.0"] == {"self_attn": "self_attn", "ffn": "mlp"}


@pytest.mark.parametrize("per_block, expected", [(1, 8), (2, 16), (3, 18)])
def test_adapters_per_block_placement(per_block, expected):
    model = get_peft_model(make_mask2former(), SeqAdapterConfig(adapters_per_block=per_block, adapter_dim=4))
    names = _layers(model, SeqAdapterLayer)
    assert len(names) == expected  # 8 blocks; only the 2 decoder blocks have a cross-attention position
    if per_block == 1:
        assert all(n.endswith((".fc2", ".mlp")) for n in names)
    if per_block == 3:
        assert sum(n.endswith(".cross_attn") for n in names) == 2


def test_cross_attention_multihead_attention_is_adapted_on_purpose():
    base = make_mask2former()
    config = DeformableLoRAConfig(extra_target_modules=["cross_attn"], init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    mha = _layers(model, LoraMultiheadAttention)
    assert len(mha) == 2 and all(n.endswith("cross_attn") for n in mha)
    # the MHA's own out_proj is not wrapped (its forward reads the weight directly)
    assert not any(n.endswith("cross_attn.base_layer.out_proj") for n in _layers(model, LoraLinear))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = forward_logits(model, x)
        assert (adapted - forward_logits(base, x)).abs().max() > 1e-4  # the MHA LoRA acts
        merged = model.merge_and_unload()
        assert isinstance(merged.model.transformer_module.decoder.layers[0].cross_attn, nn.MultiheadAttention)
        assert torch.allclose(forward_logits(merged, x), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="projection inside an nn.MultiheadAttention"):
        get_peft_model(make_mask2former(), DeformableLoRAConfig(extra_target_modules=["cross_attn.out_proj"]))


def test_both_methods_together_with_heads_save_and_load(tmp_path):
    config = DeformableLoRAConfig(
        adapters_per_block=3, adapter_dim=4, init_weights=False, modules_to_save=["class_predictor"]
    )
    model = get_peft_model(make_mask2former(), config).eval()
    assert _layers(model, LoraLinear) and _layers(model, SeqAdapterLayer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("iseg_lora_A" in n for n in trainable) and any("iseg_adapter_down" in n for n in trainable)
    assert any("class_predictor.modules_to_save" in n for n in trainable)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = forward_logits(model, x)
    with pytest.raises(ValueError, match="Cannot merge exactly: .* sequential adapter"):
        model.merge_and_unload()
    model.merge_adapter()  # LoRA folds in place; the adapters keep running: still exact
    with torch.no_grad():
        assert torch.allclose(forward_logits(model, x), expected, atol=1e-5)
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_mask2former(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(forward_logits(loaded, x), expected, atol=1e-6)
    unloaded = loaded.unload()  # removes LoRA nested under the adapter wrappers too
    assert not _layers(unloaded, LoraLinear) and not _layers(unloaded, SeqAdapterLayer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "`r` must be a positive int, got 0"),
        ({"projection_ranks": {"query_proj": 4}}, r"unknown projections \['query_proj'\]"),
        ({"projection_ranks": {"value_proj": -1}}, r"`projection_ranks\['value_proj'\]` must be an int >= 0"),
        (
            {
                "projection_ranks": dict.fromkeys(
                    ("sampling_offsets", "attention_weights", "value_proj", "output_proj"), 0
                )
            },
            "LoRA would adapt nothing",
        ),
        ({"multihead_attention_targets": ["q", "o"]}, "`multihead_attention_targets` must be a non-empty list"),
        ({"adapters_per_block": 4}, r"`adapters_per_block` must be one of \[1, 2, 3\] \(or 0 for none\), got 4"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be in \[0, 1\)"),
    ],
)
def test_deformable_lora_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeformableLoRAConfig(**kwargs)


@pytest.mark.parametrize("value", [0, 4, -1, True])
def test_adapters_per_block_outside_one_to_three(value):
    with pytest.raises(ValueError, match=rf"`adapters_per_block` must be one of \[1, 2, 3\], got {value!r}"):
        SeqAdapterConfig(adapters_per_block=value)


def test_model_without_deformable_attention():
    with pytest.raises(ValueError, match="has no multi-scale deformable attention.*SeqAdapterConfig"):
        get_peft_model(make_vit(), DeformableLoRAConfig())
    with pytest.raises(ValueError, match="has no transformer block that sequential adapters support"):
        get_peft_model(make_tiny_cnn(), SeqAdapterConfig())


def test_unknown_targets():
    with pytest.raises(ValueError, match="matches no deformable attention module.*The model has 2"):
        get_peft_model(make_mask2former(), DeformableLoRAConfig(target_modules=["decoder.layers.7.self_attn"]))
    with pytest.raises(ValueError, match="`extra_target_modules`=\\['nonexistent'\\] matches no module"):
        get_peft_model(make_mask2former(), DeformableLoRAConfig(extra_target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="only nn.Linear and nn.MultiheadAttention"):
        get_peft_model(make_mask2former(), DeformableLoRAConfig(extra_target_modules=["final_layer_norm"]))
    with pytest.raises(ValueError, match="selects `.*fc1`, which is not a transformer block"):
        get_peft_model(make_mask2former(), SeqAdapterConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="leaves no block to adapt"):
        get_peft_model(make_mask2former(), SeqAdapterConfig(target_modules=["no_such_block"]))
    with pytest.raises(ValueError, match="both a LoRA target and a sequential-adapter position"):
        get_peft_model(make_mask2former(), DeformableLoRAConfig(adapters_per_block=1, extra_target_modules=["fc2"]))
