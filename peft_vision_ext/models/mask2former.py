# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Mask2Former helpers: a small config for pretraining on the CPU, and the model's parts (backbone, pixel decoder,
transformer decoder, heads) for decoder-only tuning and per-part parameter counts.

The model itself is transformers' ``Mask2FormerForUniversalSegmentation``; with network access, a COCO checkpoint
adapts the same way::

    model = Mask2FormerForUniversalSegmentation.from_pretrained(
        "facebook/mask2former-swin-tiny-coco-instance", id2label=id2label, label2id=label2id,
        ignore_mismatched_sizes=True,  # a new class head for the new label set
    )
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import Mask2FormerConfig, SwinConfig


__all__ = ["MASK2FORMER_PARTS", "mask2former_parts", "small_mask2former_config"]

MASK2FORMER_PARTS: tuple[str, ...] = ("backbone", "pixel_decoder", "transformer_decoder", "heads")
"""Parts of a Mask2Former, in data-flow order (see :func:`mask2former_parts`)."""


def small_mask2former_config(
    *,
    id2label: dict[int, str],
    image_size: int = 128,
    embed_dim: int = 32,
    depths: Sequence[int] = (1, 1, 2, 1),
    num_heads: Sequence[int] = (1, 2, 4, 8),
    window_size: int = 4,
    hidden_dim: int = 64,
    encoder_layers: int = 2,
    decoder_layers: int = 4,
    num_queries: int = 32,
    train_num_points: int = 2048,
) -> Mask2FormerConfig:
    """A ``Mask2FormerConfig`` with the Swin + multi-scale deformable pixel decoder + masked-attention decoder
    architecture of ``facebook/mask2former-swin-*``, narrow and shallow, to pretrain a source model on the CPU.

    ``decoder_layers`` counts like transformers' config (one of them is the initial prediction from the queries),
    so ``decoder_layers=4`` gives three masked-attention decoder layers. ``train_num_points`` (mask-loss sample
    points per mask; 12544 in the COCO configs) is lowered to keep small-image training cheap.
    """
    if not id2label:
        raise ValueError(f"`id2label` must name at least one class, got {id2label!r}.")
    if len(depths) != 4 or len(num_heads) != 4:
        raise ValueError(
            f"`depths`={tuple(depths)} and `num_heads`={tuple(num_heads)} need one entry per Swin stage (4)."
        )
    if image_size % 32:
        raise ValueError(f"`image_size`={image_size} must be a multiple of 32 (the coarsest feature stride).")
    id2label = {int(k): v for k, v in id2label.items()}
    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=window_size,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=backbone,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        feature_size=hidden_dim,
        mask_feature_size=hidden_dim,
        hidden_dim=hidden_dim,
        encoder_feedforward_dim=4 * hidden_dim,
        dim_feedforward=4 * hidden_dim,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        num_attention_heads=max(1, hidden_dim // 32),
        num_queries=num_queries,
        train_num_points=train_num_points,
    )


def mask2former_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each part of a ``Mask2FormerForUniversalSegmentation`` (or of a peft model wrapping one).

    - ``"backbone"``: the image encoder (Swin);
    - ``"pixel_decoder"``: the multi-scale deformable-attention pixel decoder;
    - ``"transformer_decoder"``: queries, input projections and the masked-attention decoder with its mask embedder;
    - ``"heads"``: the class predictor.

    Decoder-only tuning ("conventional" fine-tuning in seed 001) trains everything but the backbone.
    """
    inner = model
    while not hasattr(inner, "class_predictor"):
        nxt = getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if nxt is None or nxt is inner:
            raise TypeError(
                f"{type(model).__name__} is not a Mask2FormerForUniversalSegmentation (no `class_predictor` and "
                "`model.pixel_level_module`); pass that model or a peft model wrapping it."
            )
        inner = nxt
    pixel = inner.model.pixel_level_module
    return {
        "backbone": [pixel.encoder],
        "pixel_decoder": [pixel.decoder],
        "transformer_decoder": [inner.model.transformer_module],
        "heads": [inner.class_predictor],
    }
