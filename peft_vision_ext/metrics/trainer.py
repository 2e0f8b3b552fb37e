# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Glue between :mod:`peft_vision_ext.metrics.functional` and ``transformers.Trainer``.

Segmentation logits are large (``B x num_labels x H x W`` floats), and by default the Trainer keeps every batch of
them until evaluation ends. Pass :func:`preprocess_logits_for_metrics` to the Trainer so that only the predicted
masks are kept, and :func:`make_compute_metrics` to score them::

    trainer = Trainer(
        ...,
        compute_metrics=make_compute_metrics(num_labels, ignore_index=255, id2label=model.config.id2label),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )

The metrics function also supports ``TrainingArguments(batch_eval_metrics=True)``: it then accumulates a confusion
matrix batch by batch and nothing is kept at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peft_vision_ext.metrics.functional import (
    ConfusionMatrix,
    _check_ignore_index,
    _check_num_labels,
    _label_names,
    confusion_matrix,
    metrics_from_confusion,
)


__all__ = ["make_compute_metrics", "preprocess_logits_for_metrics"]

# Value the Trainer pads predictions and labels with when it concatenates batches of different sizes.
_TRAINER_PAD_INDEX = -100

# Logits are upsampled in chunks of about this many float32 values (512 MiB), so scoring raw logits of a whole
# evaluation set does not need one huge full-resolution copy.
_UPSAMPLE_CHUNK_ELEMENTS = 1 << 27


def _first(value: Any) -> Any:
    """Models return tuples (logits, hidden states, ...); the logits come first."""
    return value[0] if isinstance(value, tuple) else value


def _check_logits(logits: Any, name: str = "logits") -> None:
    if logits.ndim != 4:
        raise ValueError(
            f"`{name}` must be segmentation logits of shape (batch, num_labels, height, width), got shape "
            f"{tuple(logits.shape)}. Pass the model's `logits` output (or a tuple whose first element is it)."
        )


def _upsample_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``(B, K, h, w)`` logits to ``size`` (if needed) and return the ``int64`` argmax masks."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1).to(torch.int64)


def preprocess_logits_for_metrics(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: Any) -> torch.Tensor:
    """Turn a batch of logits into predicted masks at label resolution, for ``Trainer(preprocess_logits_for_metrics=)``.

    Args:
        logits: ``(B, num_labels, h, w)`` logits, or a tuple of model outputs whose first element is them.
        labels: ``(B, H, W)`` label masks (only their spatial size is used); ``None`` keeps the logits' size.

    Returns:
        ``(B, H, W)`` ``int64`` tensor of class ids; the logits are upsampled bilinearly (``align_corners=False``,
        like the HF segmentation post-processors) when ``h, w`` differ from ``H, W``.
    """
    logits = _first(logits)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"`logits` must be a torch.Tensor (or a tuple starting with one), got {type(logits).__name__}. "
            f"This function is meant for `Trainer(preprocess_logits_for_metrics=...)`."
        )
    _check_logits(logits)
    labels = _first(labels)
    size = tuple(labels.shape[-2:]) if labels is not None else tuple(logits.shape[-2:])
    # No gradients are needed and none should be kept alive by the Trainer's buffers.
    with torch.no_grad():
        return _upsample_argmax(logits, size)


def _predicted_masks(predictions: Any, labels: Any) -> Any:
    """Masks from either argmaxed predictions (returned unchanged) or raw float logits (upsampled, argmaxed)."""
    size = tuple(labels.shape[-2:])
    if isinstance(predictions, torch.Tensor):
        if not predictions.is_floating_point():
            return predictions
        _check_logits(predictions, "predictions")
        with torch.no_grad():
            return _upsample_argmax(predictions, size)

    predictions = np.asarray(predictions)
    if predictions.dtype.kind != "f":
        return predictions
    _check_logits(predictions, "predictions")
    batch, num_classes = predictions.shape[:2]
    per_image = num_classes * size[0] * size[1]
    chunk = max(1, _UPSAMPLE_CHUNK_ELEMENTS // max(per_image, 1))
    masks = np.empty((batch, *size), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, batch, chunk):
            # float32 on CPU: half-precision bilinear kernels are not available on every CPU build.
            block = torch.from_numpy(np.ascontiguousarray(predictions[start : start + chunk])).float()
            masks[start : start + chunk] = _upsample_argmax(block, size).numpy()
    return masks


def _drop_trainer_padding(labels: Any, ignore_index: int) -> Any:
    """Map the Trainer's ``-100`` label padding to ``ignore_index`` so padded pixels are not counted."""
    if ignore_index == _TRAINER_PAD_INDEX:
        return labels
    if isinstance(labels, torch.Tensor):
        padded = labels == _TRAINER_PAD_INDEX
        return labels.masked_fill(padded, ignore_index) if bool(padded.any()) else labels
    labels = np.asarray(labels)
    padded = labels == _TRAINER_PAD_INDEX
    return np.where(padded, ignore_index, labels) if padded.any() else labels


def make_compute_metrics(
    num_labels: int, ignore_index: int | None = 255, id2label: Mapping[Any, str] | None = None
) -> Callable[..., dict[str, float]]:
    """Build a ``compute_metrics`` function for ``transformers.Trainer``.

    Args:
        num_labels: number of classes.
        ignore_index: label value excluded from the metrics (``None``: none). The Trainer's ``-100`` padding is
            always excluded.
        id2label: optional class names, adding ``iou_<label>`` and ``accuracy_<label>`` keys.

    Returns:
        ``compute_metrics(eval_pred, compute_result=None) -> dict[str, float]``. ``eval_pred.predictions`` may be
        argmaxed ``(B, H, W)`` integer masks (see :func:`preprocess_logits_for_metrics`) or raw ``(B, K, h, w)``
        float logits, which are upsampled bilinearly to the label size and argmaxed. Only scalar floats are returned
        (``mean_iou``, ``balanced_accuracy``, ``overall_accuracy`` and the per-label keys; nan where undefined), as
        the Trainer logs scalars. With ``batch_eval_metrics=True`` the Trainer passes ``compute_result``: batches
        are accumulated, ``{}`` is returned until the last one, and the state is reset after it.
    """
    num_labels = _check_num_labels(num_labels)
    ignore_index = _check_ignore_index(ignore_index)
    if id2label is not None:
        _label_names(id2label, num_labels)  # fail when the Trainer is built, not after a whole evaluation pass
    # No real label is negative, so with ignore_index=None ignoring the Trainer's -100 padding ignores nothing else.
    effective_ignore = _TRAINER_PAD_INDEX if ignore_index is None else ignore_index
    accumulator = ConfusionMatrix(num_labels, ignore_index=effective_ignore)

    def compute_metrics(eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        predictions, labels = eval_pred[0], eval_pred[1]  # EvalPrediction or a (predictions, labels) tuple
        predictions, labels = _first(predictions), _first(labels)
        if labels is None:
            raise ValueError(
                "`eval_pred.label_ids` is None: segmentation metrics need the label masks. Make sure the "
                "evaluation data set has a `labels` column and `TrainingArguments.label_names` is right."
            )
        if not isinstance(labels, torch.Tensor):
            labels = np.asarray(labels)
        masks = _predicted_masks(predictions, labels)
        labels = _drop_trainer_padding(labels, effective_ignore)
        if compute_result is None:
            cm = confusion_matrix(masks, labels, num_labels=num_labels, ignore_index=effective_ignore)
        else:
            accumulator.update(masks, labels)
            if not compute_result:
                return {}
            cm = accumulator.compute()
            accumulator.reset()
        metrics = metrics_from_confusion(cm, id2label=id2label)
        return {key: float(value) for key, value in metrics.items() if not isinstance(value, list)}

    return compute_metrics
