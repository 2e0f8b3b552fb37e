# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Input check, loss and output packing shared by the semantic-segmentation models of this package."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput


def check_pixel_values(pixel_values: torch.Tensor, channels: int) -> None:
    """Refuse ``pixel_values`` that are not ``(batch, channels, height, width)``, naming the shape received."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"`pixel_values` must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}."
        )


def semantic_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of ``(B, K, h, w)`` logits against ``(B, H, W)`` labels; logits are resized (bilinear) to the
    label size first. Pixels equal to ``ignore_index`` are ignored."""
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"`labels` must have shape (batch, height, width) with batch {logits.shape[0]}, got {tuple(labels.shape)}."
        )
    if tuple(labels.shape[-2:]) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def segmenter_output(
    loss: torch.Tensor | None, logits: torch.Tensor, hidden_states: tuple | None, return_dict: bool
) -> SemanticSegmenterOutput | tuple:
    """``SemanticSegmenterOutput``, or the ``(loss?, logits, hidden_states?)`` tuple when ``return_dict=False``."""
    if not return_dict:
        output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
        return ((loss,) + output) if loss is not None else output
    return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)
