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


def tiny_sam_config(num_labels: int = 3, image_size: int = 80, window_size: int = 4, attn: str = "eager"):
    """A two-block SAM: block 0 windowed (80 px / patch 8 = 10 tokens, window 4: padded windows), block 1 global."""
    from transformers import SamConfig

    config = SamConfig(
        num_labels=num_labels,
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            image_size=image_size,
            patch_size=8,
            window_size=window_size,
            global_attn_indexes=[1],
            output_channels=16,
            num_pos_feats=8,
        ),
        prompt_encoder_config=dict(
            hidden_size=16, image_size=image_size, image_embedding_size=image_size // 8, mask_input_channels=4
        ),
        mask_decoder_config=dict(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
        ),
    )
    config._attn_implementation = attn
    return config


def _perturb(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Random-init transformers models start with zero relative-position tables and tiny weights (SAM's
    initializer_range is 1e-10); give every tensor some signal so tests see real attention patterns."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def make_sam(seed: int = 0, attn: str = "eager", **kwargs) -> nn.Module:
    from peft_vision_ext.models import SamForSemanticSegmentation

    torch.manual_seed(seed)
    return _perturb(SamForSemanticSegmentation(tiny_sam_config(attn=attn, **kwargs)), seed).eval()


def make_vit(seed: int = 0, attn: str = "eager") -> nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    config._attn_implementation = attn
    return _perturb(ViTModel(config, add_pooling_layer=False), seed).eval()


def make_dinov2(seed: int = 0, attn: str = "sdpa") -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    )
    config._attn_implementation = attn
    return _perturb(Dinov2Model(config), seed).eval()


def make_mask2former(seed: int = 0) -> nn.Module:
    """A tiny Mask2Former: 4-stage Swin backbone (one block each), 2 pixel-decoder encoder layers with multi-scale
    deformable attention, 2 masked-attention decoder layers (self-attn, nn.MultiheadAttention cross-attn, FFN)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=3,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        decoder_layers=3,
        encoder_layers=2,
        num_attention_heads=2,
        num_queries=6,
        common_stride=4,
    )
    return _perturb(Mask2FormerForUniversalSegmentation(config), seed).eval()


def make_deformable_detr(seed: int = 0) -> nn.Module:
    """A tiny Deformable DETR (encoder + decoder with multi-scale deformable attention) on a tiny ResNet backbone."""
    from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

    torch.manual_seed(seed)
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    return _perturb(DeformableDetrModel(config), seed).eval()


def forward_logits(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Segmentation logits (B, K, H, W), or an encoder's last hidden state (B, N, C), or for Mask2Former its mask and
    class logits per query (B, Q, H*W + K + 1). ``kwargs`` go to the model's forward (e.g. peft's ``adapter_names``)."""
    return logits_of(model(pixel_values=x, **kwargs))


def logits_of(out) -> torch.Tensor:
    """The tensor `forward_logits` returns, from a model's output."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "masks_queries_logits", None) is not None:
        return torch.cat([out.masks_queries_logits.flatten(2), out.class_queries_logits], dim=-1)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# The modules the methods train in full on each tiny model when a config names no `modules_to_save`: those the model
# declares (`peft_modules_to_save`: SAM's mask decoder), or the task heads the seed-001 methods find by class name
# (Mask2Former's class head; the bare Deformable DETR model has none). The matrix checks that every case's saved
# config agrees, so a changed default shows up as a failing case, not as a check that silently stopped applying.
DEFAULT_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "sam_tiny": ("mask_decoder",),
    "sam_tiny_sdpa": ("mask_decoder",),
    "mask2former_tiny": ("class_predictor",),
}

FACTORIES = {
    "tiny_cnn": make_tiny_cnn,
    # The seed's backbone, once; timm's tiny test_* encoders (same block types, ~0.1-0.4M parameters) elsewhere.
    "unet_resnet18": lambda seed=0: make_unet("resnet18", seed),
    "unet_test_resnet": lambda seed=0: make_unet("test_resnet", seed),
    "unet_test_efficientnet": lambda seed=0: make_unet("test_efficientnet", seed),  # depthwise convs
    "sam_tiny": make_sam,
    "sam_tiny_sdpa": lambda seed=0: make_sam(seed, attn="sdpa"),
    "vit_tiny": make_vit,
    "dinov2_tiny": make_dinov2,
    "mask2former_tiny": make_mask2former,
    "deformable_detr_tiny": make_deformable_detr,
}
