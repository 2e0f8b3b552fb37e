# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Mask2Former in low precision: transformers' own loss fails on a pure bf16 model (no peft involved), so training
uses autocast over a float32 model. Both facts are pinned here; the README's "Training at scale" says the same."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_vision_ext  # noqa: F401
from peft_vision_ext import DeformableLoRAConfig, SeqAdapterConfig

from tiny_models import make_mask2former


def _batch(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64, generator=generator).to(dtype)
    masks = [(torch.rand(2, 64, 64, generator=generator) > 0.5).to(dtype) for _ in range(2)]
    classes = [torch.tensor([0, 1]) for _ in range(2)]
    return {"pixel_values": pixel_values, "mask_labels": masks, "class_labels": classes}


def test_pure_bf16_mask2former_loss_fails_upstream():
    """transformers' Mask2Former loss (point sampling with `grid_sample`) mixes float32 and bf16. If this stops
    raising, transformers fixed it: update the README's "Training at scale" note and this test."""
    model = make_mask2former().to(torch.bfloat16).train()
    with pytest.raises(RuntimeError, match=r"expected scalar type BFloat16 but found Float"):
        model(**_batch(torch.bfloat16))


@pytest.mark.parametrize(
    "config",
    [DeformableLoRAConfig(), SeqAdapterConfig(), DeformableLoRAConfig(adapters_per_block=2)],
    ids=["deform_lora", "seq_adapter", "both"],
)
def test_our_methods_train_mask2former_under_bf16_autocast(config):
    model = get_peft_model(make_mask2former(), config).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**_batch()).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any("iseg_" in n for n in with_grad)
    assert all("iseg_" in n or "modules_to_save" in n for n in with_grad), with_grad
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in with_grad)
