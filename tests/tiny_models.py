# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Tiny, seeded models for the test matrix. Imported by fresh subprocesses too, so it must not import peft_vision_ext
at module level (the "load without the import" test relies on that)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    """Every conv flavour the fusion math must handle, plus one conv it must refuse and a non-conv layer."""

    def __init__(self, width: int = 8, num_labels: int = 3) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1, bias=False)  # bias-free (fusion creates the bias)
        self.bn = nn.BatchNorm2d(w)
        self.down = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)  # strided, with bias
        self.depthwise = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.grouped = nn.Conv2d(2 * w, 2 * w, (3, 5), padding=(2, 4), dilation=2, groups=4, padding_mode="reflect")
        self.patch = nn.Conv2d(2 * w, 2 * w, 2, stride=2)  # even kernel: cannot be fused
        self.proj = nn.Conv2d(2 * w, 2 * w, 1)
        self.head = nn.Conv2d(2 * w, num_labels, 1)
        self.gate = nn.Linear(2 * w, 2 * w)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = pixel_values.shape[-2:]
        x = F.relu(self.bn(self.stem(pixel_values)))
        x = F.relu(self.down(x))
        x = F.relu(self.bn2(self.depthwise(x)))
        x = x + self.grouped(x)
        x = F.relu(self.proj(self.patch(x)))
        x = x * torch.sigmoid(self.gate(x.mean(dim=(2, 3))))[:, :, None, None]
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class NoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorms non-trivial statistics and affines, so tests notice if they change or are ignored."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
                # timm zero-initialises the last BN of residual blocks, which would cut the gradient to their convs.
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model


def make_tiny_cnn(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(TinyCNN(width=width), seed).eval()


def make_unet(encoder: str = "resnet18", seed: int = 0) -> nn.Module:
    from peft_vision_ext.models import UNetConfig, UNetForSemanticSegmentation

    torch.manual_seed(seed)
    config = UNetConfig(encoder_name=encoder, num_labels=3, decoder_channels=[32, 16, 16, 8, 8])
    return _randomize_bn(UNetForSemanticSegmentation(config), seed).eval()


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


FACTORIES = {
    "tiny_cnn": make_tiny_cnn,
    # The seed's backbone, once; timm's tiny test_* encoders (same block types, ~0.1-0.4M parameters) elsewhere.
    "unet_resnet18": lambda seed=0: make_unet("resnet18", seed),
    "unet_test_resnet": lambda seed=0: make_unet("test_resnet", seed),
    "unet_test_efficientnet": lambda seed=0: make_unet("test_efficientnet", seed),  # depthwise convs
}
