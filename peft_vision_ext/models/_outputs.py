# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Input checks, loss and output packing shared by the semantic-segmentation models of this package.

Labels follow the rules of :mod:`peft_vision_ext._labels`, the same ones the metrics apply to their references.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SemanticSegmenterOutput

from .._labels import (
    check_ignore_index,
    check_num_labels,
    describe,
    invalid_class_ids,
    is_integer_dtype,
    non_integer_labels_error,
    out_of_range_error,
)


# Input dtypes cast to the model's dtype, as transformers' vision models do (a float32 batch for a bf16 model is the
# usual case). float64 is refused instead: it is numpy's default and means the images skipped the image processor.
_CASTABLE_PIXEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_segmentation_num_labels(num_labels: Any) -> int:
    """``num_labels`` of a softmax segmentation model: an int >= 2 (one class makes the loss identically 0)."""
    num_labels = check_num_labels(num_labels)
    if num_labels < 2:
        raise ValueError(
            f"`num_labels` must be >= 2 for a softmax segmentation model, got {num_labels}: with a single class "
            "every pixel is that class and the cross-entropy loss is always 0. For binary segmentation use 2 labels, "
            "background and foreground: `num_labels=2`, or `id2label={0: 'background', 1: 'foreground'}`."
        )
    return num_labels


def check_loss_ignore_index(ignore_index: Any) -> int | None:
    """``config.semantic_loss_ignore_index``: an int, or None when every pixel is labelled."""
    return check_ignore_index(ignore_index, name="semantic_loss_ignore_index")


def check_pixel_values(pixel_values: Any, channels: int, model_dtype: torch.dtype) -> torch.Tensor:
    """Refuse ``pixel_values`` that are not a non-empty ``(batch, channels, height, width)`` float tensor; return them
    cast to ``model_dtype`` (float16, bfloat16 and float32 inputs are cast, as transformers' vision models do)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"`pixel_values` must be a torch.Tensor of shape (batch, {channels}, height, width), got "
            f"{describe(pixel_values)} of type {type(pixel_values).__name__}. Prepare images with the image processor "
            "(`return_tensors='pt'`) or `torch.as_tensor`, then normalise them."
        )
    if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        raise ValueError(
            f"`pixel_values` must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}."
        )
    if pixel_values.numel() == 0:
        raise ValueError(
            f"`pixel_values` is empty: got shape {tuple(pixel_values.shape)}. Pass at least one image with a height "
            "and width of at least 1 pixel (skip empty batches in the data loader, e.g. `drop_last=True`)."
        )
    dtype = pixel_values.dtype
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"`pixel_values` must be a float tensor, got dtype {dtype} (raw image values?). Convert to float and "
            "normalise, e.g. with the image processor (`processor(images, return_tensors='pt')`) or "
            "`(pixel_values.float() / 255 - mean) / std` with the encoder's mean and std."
        )
    if dtype != model_dtype and dtype not in _CASTABLE_PIXEL_DTYPES:
        raise TypeError(
            f"`pixel_values` has dtype {dtype}, but the model computes in {model_dtype}. Call `pixel_values.float()` "
            "(float16 and bfloat16 are accepted too), or `pixel_values.to(model.dtype)`."
        )
    return pixel_values.to(model_dtype)


def check_labels(labels: Any, pixel_values: torch.Tensor, num_labels: int, ignore_index: int | None) -> torch.Tensor:
    """Refuse labels the loss would misread: not integer, not ``(batch, height, width)`` of ``pixel_values``, or
    holding ids outside ``[0, num_labels)`` that are not ``ignore_index``; also refuse non-finite ``pixel_values``.

    The value checks cost one host-device synchronisation per call (both are reduced to one tensor first). They run
    only when labels are given, i.e. when training or evaluating: a NaN batch there would turn every weight into NaN
    at the next optimiser step, and on CUDA an out-of-range id is a device-side assert that ends the process.
    Inference (no labels) stays free of synchronisations; NaN pixels then give NaN logits.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"`labels` must be a torch.Tensor of class ids of shape (batch, height, width), got {describe(labels)} "
            f"of type {type(labels).__name__}. Convert it with `torch.as_tensor(labels, dtype=torch.long)`."
        )
    if not is_integer_dtype(labels.dtype):
        raise non_integer_labels_error("labels", labels, "labels.long()")
    expected = (pixel_values.shape[0], *pixel_values.shape[-2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"`labels` must have shape (batch, height, width) = {expected}, the batch and image size of "
            f"`pixel_values` (shape {tuple(pixel_values.shape)}), got {tuple(labels.shape)}. Give every image a label "
            "map of its own size: resize images and masks together (masks with nearest-neighbour interpolation)."
        )
    labels = labels.to(pixel_values.device)
    flags = torch.stack(
        [invalid_class_ids(labels, num_labels, ignore_index).any(), ~torch.isfinite(pixel_values).all()]
    ).tolist()
    if flags[0]:
        raise out_of_range_error(
            "labels",
            labels,
            num_labels,
            ignore_index,
            num_labels_name="config.num_labels",
            ignore_index_name="config.semantic_loss_ignore_index",
        )
    if flags[1]:
        raise ValueError(
            f"`pixel_values` holds NaN or infinite values (shape {tuple(pixel_values.shape)}). Check the image "
            "loading and normalisation (e.g. a division by a zero standard deviation)."
        )
    return labels


def semantic_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Cross-entropy of ``(B, K, h, w)`` logits against ``(B, H, W)`` labels checked by :func:`check_labels`; logits
    are resized (bilinear) to the label size first. Pixels equal to ``ignore_index`` are ignored."""
    assert labels.ndim == 3 and labels.shape[0] == logits.shape[0], (tuple(labels.shape), tuple(logits.shape))
    if tuple(labels.shape[-2:]) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ignore_index = -100 if ignore_index is None else ignore_index  # None: no label is ignored (all are in range)
    return F.cross_entropy(logits, labels.to(device=logits.device, dtype=torch.long), ignore_index=ignore_index)


def segmenter_output(
    loss: torch.Tensor | None, logits: torch.Tensor, hidden_states: tuple | None, return_dict: bool
) -> SemanticSegmenterOutput | tuple:
    """``SemanticSegmenterOutput``, or the ``(loss?, logits, hidden_states?)`` tuple when ``return_dict=False``."""
    if not return_dict:
        output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
        return ((loss,) + output) if loss is not None else output
    return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)
