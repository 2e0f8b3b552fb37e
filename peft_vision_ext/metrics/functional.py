# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Semantic segmentation metrics as plain numpy functions.

Everything is derived from one ``num_labels x num_labels`` confusion matrix (rows: reference class, columns:
predicted class), so the metrics of a whole evaluation set can be accumulated image by image
(:class:`ConfusionMatrix`) without keeping the masks in memory, and results from several workers can be summed.

Inputs may be numpy arrays, torch tensors (converted with ``.detach().cpu().numpy()``; torch itself is never
imported here, which keeps this module cheap to import inside the ``evaluate`` metric script), PIL images or nested
lists. A batch may be one array of any shape or a list of arrays of differing shapes, as long as each prediction has
the shape of its reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

# The label rules are shared with the models' loss; the underscored names are this module's historical API.
from peft_vision_ext._labels import check_ignore_index as _check_ignore_index
from peft_vision_ext._labels import check_num_labels as _check_num_labels
from peft_vision_ext._labels import describe as _describe
from peft_vision_ext._labels import is_integer_dtype, non_integer_labels_error, out_of_range_error


__all__ = [
    "ConfusionMatrix",
    "compute_segmentation_metrics",
    "confusion_matrix",
    "metrics_from_confusion",
]

# Pixels are processed in slices of this many, and codes of small masks are buffered until this many are pending
# and then counted with one ``np.bincount``: lists of small masks (or of scalars) do not pay one ``num_labels**2``
# histogram each, and big arrays do not need several full-size int64 temporaries.
_CHUNK_PIXELS = 1 << 20


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor, PIL image or nested list to a numpy integer array.

    Raises:
        TypeError: when the values are not integers (or booleans); float arrays are almost always logits or
            probabilities passed by mistake, so they are refused rather than silently truncated.
    """
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{name}` must be an integer array (numpy array, torch tensor or nested list), got {_describe(value)}: "
            f"{err}. Pass one array per image, or a list of arrays."
        ) from None
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if not is_integer_dtype(array.dtype):
        raise non_integer_labels_error(name, array, ".astype(np.int64)")
    return array


def _is_batch_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _iter_pairs(predictions: Any, references: Any) -> Iterator[tuple[Any, Any, int | None]]:
    """Yield ``(prediction, reference, index)`` pairs; ``index`` is None for single-array input.

    If either side is a list/tuple both are walked in parallel along their first axis (an array's first axis is its
    batch axis), so a ``(B, H, W)`` array may be paired with a list of ``B`` masks. Nested python lists describing a
    single mask are walked row by row, which counts exactly the same pixels.
    """
    if not (_is_batch_list(predictions) or _is_batch_list(references)):
        yield predictions, references, None
        return
    n_pred, n_ref = len(predictions), len(references)
    if n_pred != n_ref:
        raise ValueError(
            f"`predictions` and `references` must hold the same number of masks, got {n_pred} predictions and "
            f"{n_ref} references. Pass one prediction per reference, in the same order."
        )
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        yield prediction, reference, index


def _checked_codes(
    pred: np.ndarray, ref: np.ndarray, where: str, num_labels: int, ignore_index: int | None
) -> np.ndarray:
    """Codes ``reference * num_labels + prediction`` of the counted pixels of two flat slices, after range checks."""
    if ignore_index is not None:
        keep = ref != ignore_index
        if not keep.all():
            pred = pred[keep]
            ref = ref[keep]
    if ref.size == 0:
        return np.empty(0, dtype=np.int64)

    # min/max are one pass each and tell us whether there is anything to report; the slower np.unique only runs
    # to build the error message.
    if ref.min() < 0 or ref.max() >= num_labels:
        raise out_of_range_error(f"references{where}", ref, num_labels, ignore_index)
    # Predictions are only checked where they are counted: ignored pixels (e.g. the -100 padding the Trainer adds)
    # cannot change any metric.
    if pred.min() < 0 or pred.max() >= num_labels:
        bad = np.unique(pred[(pred < 0) | (pred >= num_labels)])[:10].tolist()
        raise ValueError(
            f"`predictions{where}` holds class ids outside [0, {num_labels}): {bad}. Predictions must be argmax "
            f"class ids of a model with `num_labels={num_labels}` outputs; check `num_labels`."
        )
    # int64 before multiplying: uint8/uint16 masks would overflow. The product is a fresh array, so the addition
    # can reuse it.
    codes = ref.astype(np.int64) * num_labels
    codes += pred.astype(np.int64, copy=False)
    return codes


def _pair_codes(
    prediction: Any, reference: Any, index: int | None, num_labels: int, ignore_index: int | None
) -> Iterator[np.ndarray]:
    """Validate one prediction/reference pair and yield the codes of its counted pixels, slice by slice."""
    where = "" if index is None else f"[{index}]"
    pred = _to_numpy(prediction, f"predictions{where}")
    ref = _to_numpy(reference, f"references{where}")
    if pred.shape != ref.shape:
        raise ValueError(
            f"`predictions{where}` and `references{where}` must have the same shape, got predictions of shape "
            f"{pred.shape} and references of shape {ref.shape}. Resize the predicted logits to the label size "
            f"(e.g. bilinear upsampling) before the argmax."
        )
    pred = pred.ravel()
    ref = ref.ravel()
    # Slicing a whole (B, H, W) evaluation set keeps the temporaries (masks, int64 codes) cache-sized instead of
    # several full-size copies.
    for start in range(0, ref.size, _CHUNK_PIXELS):
        yield _checked_codes(
            pred[start : start + _CHUNK_PIXELS], ref[start : start + _CHUNK_PIXELS], where, num_labels, ignore_index
        )


def _add_counts(cm: np.ndarray, pending: list[np.ndarray]) -> None:
    """Histogram the buffered pixel codes into ``cm`` (in place) and empty the buffer."""
    if pending:
        num_labels = cm.shape[0]
        codes = pending[0] if len(pending) == 1 else np.concatenate(pending)
        cm += np.bincount(codes, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
        pending.clear()


def _accumulate(cm: np.ndarray, predictions: Any, references: Any, ignore_index: int | None) -> None:
    """Add the pixel counts of a batch to ``cm`` in place."""
    pending: list[np.ndarray] = []
    n_pending = 0
    for prediction, reference, index in _iter_pairs(predictions, references):
        for codes in _pair_codes(prediction, reference, index, cm.shape[0], ignore_index):
            pending.append(codes)
            n_pending += codes.size
            if n_pending >= _CHUNK_PIXELS:
                _add_counts(cm, pending)
                n_pending = 0
    _add_counts(cm, pending)


def confusion_matrix(predictions: Any, references: Any, num_labels: int, ignore_index: int | None = 255) -> np.ndarray:
    """Pixel confusion matrix of a segmentation batch.

    Args:
        predictions: predicted class ids: an integer array/tensor of any shape, or a list of them (one per image,
            shapes may differ between images).
        references: ground-truth class ids, same structure and shapes as ``predictions``.
        num_labels: number of classes; valid ids are ``0 .. num_labels - 1``.
        ignore_index: reference value whose pixels are not counted (``None`` counts every pixel).

    Returns:
        ``int64`` array of shape ``(num_labels, num_labels)``; entry ``[i, j]`` counts pixels of reference class ``i``
        predicted as class ``j``.

    Raises:
        ValueError: on mismatched shapes or lengths, ``num_labels < 1``, or class ids out of range.
        TypeError: on non-integer inputs or arguments of the wrong type.
    """
    num_labels = _check_num_labels(num_labels)
    ignore_index = _check_ignore_index(ignore_index)
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    _accumulate(cm, predictions, references, ignore_index)
    return cm


class ConfusionMatrix:
    """Streaming confusion matrix: feed batches with :meth:`update`, read the total with :meth:`compute`.

    Only the ``num_labels x num_labels`` counts are kept, so a whole evaluation set can be scored without storing its
    masks. ``update`` validates a batch completely before adding it, so a bad batch leaves the counts unchanged.

    Example:
        >>> cm = ConfusionMatrix(num_labels=3)
        >>> for pred, ref in batches:  # doctest: +SKIP
        ...     cm.update(pred, ref)
        >>> metrics = metrics_from_confusion(cm.compute())  # doctest: +SKIP
    """

    def __init__(self, num_labels: int, ignore_index: int | None = 255) -> None:
        self.num_labels = _check_num_labels(num_labels)
        self.ignore_index = _check_ignore_index(ignore_index)
        self._cm = np.zeros((self.num_labels, self.num_labels), dtype=np.int64)

    def update(self, predictions: Any, references: Any) -> None:
        """Add a batch (same input forms as :func:`confusion_matrix`)."""
        batch = np.zeros_like(self._cm)
        _accumulate(batch, predictions, references, self.ignore_index)
        self._cm += batch

    def compute(self) -> np.ndarray:
        """Return a copy of the accumulated counts (``int64``, ``(num_labels, num_labels)``)."""
        return self._cm.copy()

    def reset(self) -> None:
        """Zero the counts, e.g. between evaluation runs."""
        self._cm[...] = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_labels={self.num_labels}, ignore_index={self.ignore_index}, "
            f"pixels={int(self._cm.sum())})"
        )


def _label_names(id2label: Mapping[Any, str], num_labels: int) -> list[str]:
    """Per-class names from ``id2label``; accepts the string keys a JSON round trip of a HF config produces."""
    if not isinstance(id2label, Mapping):
        raise TypeError(
            f"`id2label` must be a mapping from class id to name, got {_describe(id2label)}. "
            f"Pass e.g. `model.config.id2label`."
        )
    names = [str(i) for i in range(num_labels)]
    for key, name in id2label.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"`id2label` keys must be class ids (ints or digit strings), got key {key!r}. "
                f"Pass e.g. `{{0: 'background', 1: 'rock'}}`."
            ) from None
        if not 0 <= class_id < num_labels:
            raise ValueError(
                f"`id2label` has class id {class_id} ({name!r}) outside [0, {num_labels}), the confusion matrix's "
                f"classes. Check that `num_labels` matches `id2label`."
            )
        names[class_id] = str(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"`id2label` gives several classes the same name: {duplicates}; the flat `iou_<label>` keys would "
            f"overwrite each other. Give every class a distinct name."
        )
    return names


def _to_float_list(values: np.ndarray) -> list[float]:
    """Plain python floats (nan kept), so results serialise to JSON and compare cleanly."""
    return [float(v) for v in values]


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-nan entries; nan (without numpy's RuntimeWarning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def metrics_from_confusion(cm: Any, id2label: Mapping[Any, str] | None = None) -> dict[str, Any]:
    """Segmentation metrics from a confusion matrix (rows: reference class, columns: predicted class).

    Args:
        cm: square non-negative count matrix, e.g. from :func:`confusion_matrix`.
        id2label: optional class names; adds flat ``iou_<label>`` and ``accuracy_<label>`` keys.

    Returns:
        A dict with

        - ``mean_iou``: mean of the per-class IoU over classes with a non-empty union (present in the references or
          the predictions); nan if there is none.
        - ``per_category_iou``: list of ``TP / (TP + FP + FN)``; nan where the union is empty.
        - ``balanced_accuracy``: mean per-class recall over classes present in the references.
        - ``per_category_accuracy``: list of per-class recall ``TP / (TP + FN)``; nan for classes absent from the
          references.
        - ``overall_accuracy``: fraction of counted pixels predicted correctly; nan if nothing was counted.
        - with ``id2label``: ``iou_<label>`` and ``accuracy_<label>`` for every class.
    """
    if hasattr(cm, "detach") and hasattr(cm, "cpu"):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(
            f"`cm` must be a non-empty square (num_labels, num_labels) matrix, got {_describe(cm)}. "
            f"Build it with `confusion_matrix(predictions, references, num_labels)`."
        )
    if cm.dtype.kind not in "iuf":
        raise TypeError(
            f"`cm` must hold numeric pixel counts, got {_describe(cm)}. "
            f"Build it with `confusion_matrix(predictions, references, num_labels)`."
        )
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError(
            f"`cm` must hold finite non-negative pixel counts, got {_describe(cm)} with minimum {np.min(cm)}. "
            f"Build it with `confusion_matrix(predictions, references, num_labels)`."
        )
    cm = cm.astype(np.float64)
    num_labels = cm.shape[0]
    true_positive = np.diag(cm)
    reference_count = cm.sum(axis=1)  # TP + FN
    predicted_count = cm.sum(axis=0)  # TP + FP
    union = reference_count + predicted_count - true_positive

    # np.divide with `where` leaves the nan fill untouched for empty classes and emits no division warnings.
    iou = np.divide(true_positive, union, out=np.full(num_labels, np.nan), where=union > 0)
    recall = np.divide(true_positive, reference_count, out=np.full(num_labels, np.nan), where=reference_count > 0)
    total = cm.sum()

    result: dict[str, Any] = {
        "mean_iou": _nanmean(iou),
        "per_category_iou": _to_float_list(iou),
        "balanced_accuracy": _nanmean(recall),
        "per_category_accuracy": _to_float_list(recall),
        "overall_accuracy": float(true_positive.sum() / total) if total > 0 else math.nan,
    }
    if id2label is not None:
        names = _label_names(id2label, num_labels)
        for name, value in zip(names, iou):
            result[f"iou_{name}"] = float(value)
        for name, value in zip(names, recall):
            result[f"accuracy_{name}"] = float(value)
    return result


def compute_segmentation_metrics(
    predictions: Any,
    references: Any,
    num_labels: int,
    ignore_index: int | None = 255,
    id2label: Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """One-shot :func:`confusion_matrix` followed by :func:`metrics_from_confusion`; see those for the arguments."""
    if id2label is not None:
        # Fail on a bad id2label before counting pixels of a whole evaluation set.
        _label_names(id2label, _check_num_labels(num_labels))
    cm = confusion_matrix(predictions, references, num_labels=num_labels, ignore_index=ignore_index)
    return metrics_from_confusion(cm, id2label=id2label)
