# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""What a semantic-segmentation label map is, written once for the metrics and the models.

:mod:`peft_vision_ext.metrics.functional` checks its ``references`` (numpy) and the segmentation models' loss
(:mod:`peft_vision_ext.models._outputs`) checks its ``labels`` (torch) with these rules, so both refuse the same maps
with the same words:

- class ids are integers (booleans count as 0/1); floats are refused, never truncated;
- every id is in ``[0, num_labels)`` or equals the ignore value;
- ``num_labels`` is a positive int; the ignore value is an int, or ``None`` when no pixel is ignored.

torch is never imported here (the ``evaluate`` metric script imports the metrics without it): the checks use only
operations that numpy arrays and torch tensors share.
"""

from __future__ import annotations

from typing import Any

import numpy as np


# How many distinct offending ids an error message lists.
MAX_REPORTED_IDS = 10


def describe(value: Any) -> str:
    """Short description of a received value for error messages (shapes, not contents, of big arrays)."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {getattr(value, 'dtype', '?')}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_num_labels(num_labels: Any, name: str = "num_labels") -> int:
    """Validate ``num_labels`` (a positive int; bools are refused because ``True`` is easily passed by mistake)."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be an int (the number of classes), got {num_labels!r} of type "
            f"{type(num_labels).__name__}. Pass e.g. `num_labels=len(id2label)`."
        )
    if num_labels < 1:
        raise ValueError(
            f"`{name}` must be >= 1 (the number of classes), got {num_labels}. Pass e.g. `num_labels=len(id2label)`."
        )
    return int(num_labels)


def check_ignore_index(ignore_index: Any, name: str = "ignore_index") -> int | None:
    """Validate an ignore value (``None`` or an int)."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be an int or None, got {ignore_index!r} of type {type(ignore_index).__name__}. "
            f"Use e.g. `{name}=255`, or `{name}=None` to count every pixel."
        )
    return int(ignore_index)


def is_integer_dtype(dtype: Any) -> bool:
    """Whether a numpy dtype or a torch dtype holds integers or booleans (the dtypes a label map may have)."""
    kind = getattr(dtype, "kind", None)
    if isinstance(kind, str):  # numpy
        return kind in "iub"
    return not (dtype.is_floating_point or dtype.is_complex)  # torch.dtype, without importing torch


def non_integer_labels_error(name: str, value: Any, cast: str) -> TypeError:
    """The error for a label map of a float (or other non-integer) dtype; ``cast`` is the fix, e.g. ``.long()``."""
    return TypeError(
        f"`{name}` must hold integer class ids, got {describe(value)}. If these are logits or probabilities, "
        f"take the argmax over the class axis first (e.g. `logits.argmax(1)`); if they are whole numbers stored "
        f"as floats, check that they are and cast them with `{cast}`."
    )


def invalid_class_ids(ids: Any, num_labels: int, ignore_index: int | None) -> Any:
    """Elementwise mask of the entries of ``ids`` (numpy array or torch tensor) that are neither a class id in
    ``[0, num_labels)`` nor ``ignore_index``."""
    invalid = (ids < 0) | (ids >= num_labels)
    if ignore_index is not None and not 0 <= ignore_index < num_labels:
        invalid &= ids != ignore_index
    return invalid


def out_of_range_error(
    name: str,
    ids: Any,
    num_labels: int,
    ignore_index: int | None,
    *,
    num_labels_name: str = "num_labels",
    ignore_index_name: str = "ignore_index",
) -> ValueError:
    """The error for a label map holding ids outside ``[0, num_labels)`` that are not ``ignore_index``; lists up to
    :data:`MAX_REPORTED_IDS` of them. Only call it once a check (e.g. :func:`invalid_class_ids`) found some."""
    bad = ids[invalid_class_ids(ids, num_labels, ignore_index)]
    if hasattr(bad, "detach") and hasattr(bad, "cpu"):  # torch.Tensor, without importing torch
        bad = bad.detach().cpu().numpy()
    bad = np.unique(bad)[:MAX_REPORTED_IDS].tolist()
    ignored = "" if ignore_index is None else f" or the ignore value {ignore_index}"
    return ValueError(
        f"`{name}` holds class ids outside [0, {num_labels}){ignored}: {bad}. Check `{num_labels_name}` "
        f"(got {num_labels}) and `{ignore_index_name}` (got {ignore_index}), or remap these labels first."
    )
