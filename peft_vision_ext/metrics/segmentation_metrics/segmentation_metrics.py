# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""``evaluate`` metric script: mean IoU, balanced accuracy and pixel accuracy for semantic segmentation.

Load it offline with ``peft_vision_ext.metrics.load_segmentation_metric()`` or
``evaluate.load(peft_vision_ext.metrics.SEGMENTATION_METRIC_PATH)``. ``evaluate`` copies this file into its modules
cache and imports it from there, so every import must be absolute (no relative imports); the numbers come from
:mod:`peft_vision_ext.metrics.functional`, which therefore has to be installed.

Masks are stored with the ``datasets.Image`` feature, as in ``evaluate``'s ``mean_iou``: it holds 2-D masks of any
size, and ``uint8`` masks are PNG-compressed, which on 512x512 masks is about four times faster to write and read
back than the nested ``Sequence(Sequence(Value))`` alternative (that one comes back as python lists of ints).
:meth:`SegmentationMetrics.add_batch` converts each mask to the smallest lossless image dtype first (``uint8``,
``uint16``, else ``int32``), so class ids, 255 and negative ignore values all survive the round trip.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

from peft_vision_ext.metrics.functional import _to_numpy, compute_segmentation_metrics


_CITATION = """\
@inproceedings{brodersen2010balanced,
  title     = {The Balanced Accuracy and Its Posterior Distribution},
  author    = {Brodersen, Kay Henning and Ong, Cheng Soon and Stephan, Klaas Enno and Buhmann, Joachim M.},
  booktitle = {20th International Conference on Pattern Recognition (ICPR)},
  pages     = {3121--3124},
  year      = {2010}
}
@article{everingham2010pascal,
  title   = {The Pascal Visual Object Classes (VOC) Challenge},
  author  = {Everingham, Mark and Van Gool, Luc and Williams, Christopher K. I. and Winn, John and Zisserman, Andrew},
  journal = {International Journal of Computer Vision},
  volume  = {88},
  number  = {2},
  pages   = {303--338},
  year    = {2010}
}
"""

_DESCRIPTION = """\
Semantic segmentation metrics computed from one pixel confusion matrix accumulated over all images:
mean Intersection-over-Union (IoU = TP / (TP + FP + FN) per class, averaged over classes that occur in the
references or the predictions), balanced accuracy (per-class recall TP / (TP + FN), averaged over the classes
present in the references; robust to the heavy class imbalance of segmentation data) and overall pixel accuracy.
Pixels whose reference equals `ignore_index` are not counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D integer arrays / tensors, or a `(batch, height, width)` array):
        Predicted class ids, one mask per image. Masks may differ in size between images.
    references (same structure as `predictions`):
        Ground-truth class ids; each must have the shape of its prediction.
    num_labels (`int`):
        Number of classes; valid class ids are `0 .. num_labels - 1`.
    ignore_index (`int` or `None`, defaults to 255):
        Reference value whose pixels are excluded.
    id2label (`dict[int, str]`, *optional*):
        Class names; adds flat `iou_<label>` and `accuracy_<label>` results.

Returns:
    mean_iou (`float`): mean IoU over classes with a non-empty union (nan if none).
    per_category_iou (`list[float]`): IoU per class, nan where the class is in neither references nor predictions.
    balanced_accuracy (`float`): mean per-class recall over classes present in the references.
    per_category_accuracy (`list[float]`): recall per class, nan where the class is absent from the references.
    overall_accuracy (`float`): fraction of counted pixels predicted correctly.
    iou_<label>, accuracy_<label> (`float`): only with `id2label`.

Examples:
    >>> import numpy as np
    >>> import peft_vision_ext.metrics
    >>> metric = peft_vision_ext.metrics.load_segmentation_metric()
    >>> predictions = [np.array([[0, 1], [1, 1]]), np.array([[2, 2, 0]])]
    >>> references = [np.array([[0, 1], [0, 1]]), np.array([[2, 2, 255]])]
    >>> results = metric.compute(predictions=predictions, references=references, num_labels=3)
    >>> round(results["balanced_accuracy"], 4)
    0.8333
"""


def _encodable_mask(mask: Any, name: str) -> np.ndarray:
    """One mask as a 2-D array of the smallest dtype ``datasets.Image`` stores losslessly.

    ``datasets.Image`` would otherwise downcast e.g. ``int64`` itself, with a warning per mask, and write it as
    an uncompressed 32-bit TIFF.
    """
    array = _to_numpy(mask, name)  # integer (or bool -> uint8) array, with the package's own error messages
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D (height, width) mask of class ids, got shape {array.shape}. Pass one mask per "
            f"image (squeeze channel axes; argmax logits over the class axis first)."
        )
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array if array.dtype == dtype else array.astype(dtype)
    raise ValueError(
        f"`{name}` holds values in [{low}, {high}], which do not fit in int32. Class ids and the ignore value "
        f"must be small integers; remap the labels."
    )


def _encodable_batch(masks: Any, name: str) -> list[np.ndarray] | None:
    """A batch (list of masks or ``(B, H, W)`` array) as a list of encodable 2-D masks; ``None`` passes through."""
    if masks is None:
        return None
    if hasattr(masks, "detach") and hasattr(masks, "cpu"):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray) and masks.ndim != 3:
        raise ValueError(
            f"`{name}` must be a batch of 2-D masks: a list of (height, width) arrays or one array of shape "
            f"(batch, height, width), got an array of shape {masks.shape}. Wrap a single mask in a list, or use "
            f"`add(prediction=..., reference=...)`."
        )
    return [_encodable_mask(mask, f"{name}[{i}]") for i, mask in enumerate(masks)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegmentationMetrics(evaluate.Metric):
    """mIoU, balanced accuracy and pixel accuracy over 2-D integer masks of any size."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=[
                "https://en.wikipedia.org/wiki/Jaccard_index",
                "https://doi.org/10.1109/ICPR.2010.764",
            ],
        )

    def add_batch(self, *, predictions: Any = None, references: Any = None, **kwargs: Any) -> None:
        """Add a batch of masks (``compute(predictions=..., references=...)`` goes through here too)."""
        super().add_batch(
            predictions=_encodable_batch(predictions, "predictions"),
            references=_encodable_batch(references, "references"),
            **kwargs,
        )

    def add(self, *, prediction: Any = None, reference: Any = None, **kwargs: Any) -> None:
        """Add one prediction/reference mask pair."""
        super().add(
            prediction=None if prediction is None else _encodable_mask(prediction, "prediction"),
            reference=None if reference is None else _encodable_mask(reference, "reference"),
            **kwargs,
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[Any],
        num_labels: int,
        ignore_index: int | None = 255,
        id2label: dict[int, str] | None = None,
    ) -> dict[str, Any]:
        # Decoded masks are PIL images; np.asarray reads them without copying through python objects.
        return compute_segmentation_metrics(
            [np.asarray(p) for p in predictions],
            [np.asarray(r) for r in references],
            num_labels=num_labels,
            ignore_index=ignore_index,
            id2label=id2label,
        )
