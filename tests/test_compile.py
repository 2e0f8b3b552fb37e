# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""`torch.compile` of an adapted model in eval mode: one graph, no recompilation per call, never a stale kernel.

The tracing backend ("eager") keeps this fast on CPU: what is checked is Dynamo's capture (graph breaks and guards),
which is what a user's `torch.compile(model)` goes through before any backend compiles the graph."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo as dynamo
from peft import get_peft_model

import peft_vision_ext  # noqa: F401
from peft_vision_ext import ConvAdapterConfig

from testing_common import rel_diff
from tiny_models import make_unet


@pytest.fixture
def conv_adapter_unet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Conv adapters leave out")
        return get_peft_model(make_unet("test_resnet"), ConvAdapterConfig(init_weights=False)).eval()


@torch.no_grad()
def test_conv_adapter_eval_is_one_graph_compiled_once_and_follows_weight_changes(conv_adapter_unet):
    dynamo.reset()
    # fullgraph=True: any graph break (the old folded-kernel cache made 31) raises at the first call.
    compiled = torch.compile(conv_adapter_unet, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    assert rel_diff(compiled(pixel_values=x).logits, conv_adapter_unet(pixel_values=x).logits) < 1e-5
    frames = dynamo.utils.counters["stats"]["unique_graphs"]
    layer = next(m for m in conv_adapter_unet.modules() if hasattr(m, "convadapter_conv") and m.convadapter_conv)
    layer.convadapter_conv["default"].weight.data.mul_(2.0)  # an in-place change, invisible to tensor versions
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32)
        assert rel_diff(compiled(pixel_values=x).logits, conv_adapter_unet(pixel_values=x).logits) < 1e-5
    assert dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a call recompiled the model"
