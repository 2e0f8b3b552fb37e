# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""COCO-protocol mask AP for instance segmentation models with Mask2Former-style outputs.

- :func:`post_process_instance_predictions` turns Mask2Former's ``class_queries_logits`` and ``masks_queries_logits``
  into scored, possibly overlapping binary instance masks (Mask2Former's own instance protocol).
- :class:`CocoMaskAP` accumulates predictions and ground truth image by image, RLE-encoded so that a whole evaluation
  set stays small, and scores them with ``pycocotools``' ``COCOeval(iouType="segm")``.
- :func:`evaluate_instance_segmentation` runs a model over a dataloader and returns the metrics; it can gather the
  encoded records of several processes (e.g. with accelerate's ``gather_object``).

Conventions worth knowing when reading the numbers:

- Class ids are 0-based (``id2label`` of the model); COCO category ids are ``id + 1`` internally.
- pycocotools reports ``-1`` for an undefined value, e.g. ``map_large`` when no ground-truth instance is large
  (COCO's area ranges: small < 32², medium 32²..96², large > 96² pixels) or the AP of a class without ground truth.
  These ``-1.0`` are kept as they are and are left out of every mean over classes.
- Detections of a class that has no ground truth anywhere are not counted as false positives (COCO skips the class).
- ``max_detections`` caps detections per image *and class* (that is how ``COCOeval`` applies ``maxDets``); the
  per-image cap is ``top_k`` of the post-processing.
"""

from __future__ import annotations

import contextlib
import io
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peft_vision_ext.metrics.functional import _describe


__all__ = ["CocoMaskAP", "evaluate_instance_segmentation", "post_process_instance_predictions"]

# Masks are upsampled this many pixels at a time (about 64 MiB of float32), so many queries at a large target size do
# not need one (Q, H, W) float tensor.
_UPSAMPLE_CHUNK_PIXELS = 1 << 24

# Keys of one encoded image record (see ``CocoMaskAP.encode``).
_RECORD_KEYS = (
    "height",
    "width",
    "pred_segmentations",
    "pred_scores",
    "pred_labels",
    "gt_segmentations",
    "gt_labels",
    "gt_areas",
    "gt_bboxes",
)

# Summary keys, named like torchmetrics' MeanAveragePrecision: (key, AP (else AR), IoU threshold, area, maxDets index).
_SUMMARY = (
    ("map", True, None, "all", 2),
    ("map_50", True, 0.5, "all", 2),
    ("map_75", True, 0.75, "all", 2),
    ("map_small", True, None, "small", 2),
    ("map_medium", True, None, "medium", 2),
    ("map_large", True, None, "large", 2),
    ("mar_1", False, None, "all", 0),
    ("mar_10", False, None, "all", 1),
    ("mar_100", False, None, "all", 2),
    ("mar_small", False, None, "small", 2),
    ("mar_medium", False, None, "medium", 2),
    ("mar_large", False, None, "large", 2),
)


def _import_pycocotools() -> tuple[Any, Any, Any]:
    """``(mask_utils, COCO, COCOeval)``, imported on first use so the metrics package imports without pycocotools."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise ImportError(
            f"COCO mask AP needs pycocotools ({err}). Install it with `pip install 'pycocotools>=2.0.7'`."
        ) from err
    return mask_utils, COCO, COCOeval


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_id2label(id2label: Any) -> dict[int, str]:
    """Normalise ``id2label`` to ``{int: str}``; accepts the digit-string keys of a JSON round trip of a HF config."""
    if not isinstance(id2label, Mapping) or not id2label:
        raise TypeError(
            f"`id2label` must be a non-empty mapping from 0-based class id to name, got {_describe(id2label)}. "
            f"Pass e.g. `model.config.id2label`."
        )
    result: dict[int, str] = {}
    for key, name in id2label.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"`id2label` keys must be class ids (ints or digit strings), got key {key!r}. "
                f"Pass e.g. `{{0: 'rock', 1: 'boulder'}}`."
            ) from None
        if class_id < 0:
            raise ValueError(
                f"`id2label` class ids must be >= 0 (0-based, as in the model config), got {class_id} ({name!r}). "
                f"Do not include Mask2Former's 'no object' class."
            )
        result[class_id] = str(name)
    names = list(result.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"`id2label` gives several classes the same name: {duplicates}; `map_per_class` is keyed by name. "
            f"Give every class a distinct name."
        )
    return dict(sorted(result.items()))


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """numpy view of a tensor (detached, on CPU; half precision widened), array or nested list."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        return value.cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a torch tensor or numpy array, got {_describe(value)}: {err}.") from None


def _binary_masks(value: Any, name: str) -> np.ndarray:
    """``(N, H, W)`` bool masks from bool, 0/1 integer or 0/1 float input (Mask2Former's ``mask_labels`` are float)."""
    masks = _to_numpy(value, name)
    if masks.ndim != 3:
        raise ValueError(
            f"`{name}` must be a stack of binary masks of shape (N, H, W), got {_describe(masks)}. "
            f"Use shape (0, H, W) for an image without instances and `mask[None]` for a single mask."
        )
    if masks.dtype.kind == "b":
        return masks
    if masks.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must hold bool or 0/1 values, got {_describe(masks)}.")
    if masks.size and not ((masks == 0) | (masks == 1)).all():
        raise ValueError(
            f"`{name}` must be binary (bool or 0/1), got {_describe(masks)} with values such as "
            f"{np.unique(masks)[:6].tolist()}. Threshold probabilities or logits first (e.g. `masks.sigmoid() > 0.5`)."
        )
    return masks != 0


def _label_array(value: Any, name: str, length: int, id2label: Mapping[int, str]) -> np.ndarray:
    """1-D int64 class ids of ``length`` entries, all in ``id2label``."""
    labels = _to_numpy(value, name)
    if labels.ndim != 1 or labels.shape[0] != length:
        raise ValueError(
            f"`{name}` must have shape ({length},), one class id per mask, got {_describe(labels)}. "
            f"Pass one label per mask, in the same order."
        )
    if labels.size and labels.dtype.kind not in "iu":
        raise TypeError(
            f"`{name}` must hold integer class ids, got {_describe(labels)}. Cast it with `.long()` / "
            f"`.astype(np.int64)`."
        )
    labels = labels.astype(np.int64)
    bad = sorted({int(label) for label in labels.tolist() if int(label) not in id2label})
    if bad:
        raise ValueError(
            f"`{name}` holds class ids that are not in `id2label`: {bad[:10]}; valid ids are {sorted(id2label)[:20]}. "
            f"Labels are 0-based model class ids (no 'no object' class); check `id2label` or remap the labels."
        )
    return labels


def _score_array(value: Any, name: str, length: int) -> np.ndarray:
    scores = _to_numpy(value, name)
    if scores.ndim != 1 or scores.shape[0] != length:
        raise ValueError(
            f"`{name}` must have shape ({length},), one confidence per predicted mask, got {_describe(scores)}."
        )
    if scores.size and (scores.dtype.kind not in "iuf" or not np.isfinite(scores).all()):
        raise ValueError(f"`{name}` must hold finite numbers, got {_describe(scores)}: {scores[:5].tolist()}.")
    return scores.astype(np.float64)


def _encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (``{"size": [H, W], "counts": bytes}``) of ``(N, H, W)`` bool masks."""
    if masks.shape[0] == 0:
        return []
    mask_utils, _, _ = _import_pycocotools()
    # One call for the stack: pycocotools encodes an (H, W, N) Fortran-ordered uint8 array mask by mask.
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


@torch.no_grad()
def post_process_instance_predictions(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_size: tuple[int, int],
    *,
    top_k: int = 100,
    mask_threshold: float = 0.5,
) -> list[dict[str, torch.Tensor]]:
    """Mask2Former instance predictions: scored, possibly overlapping binary masks per image.

    Per image: class probabilities are the softmax over the ``K + 1`` classes with the last ("no object") column
    dropped; the ``top_k`` (query, class) pairs with the highest probability over all ``Q * K`` pairs are kept; the
    mask of a pair is ``sigmoid(mask logits of its query, bilinearly upsampled to target_size) > mask_threshold``;
    its score is the class probability times the mean sigmoid probability inside the binary mask (0 for an empty
    mask). A query may appear several times with different classes, as in Mask2Former's evaluation.

    Args:
        class_queries_logits: ``(B, Q, K + 1)`` class logits, the last class being "no object".
        masks_queries_logits: ``(B, Q, h, w)`` mask logits (Mask2Former predicts them at 1/4 of the input size).
        target_size: ``(H, W)`` the masks are upsampled to (``align_corners=False``), e.g. the label size.
        top_k: (query, class) pairs kept per image; capped at ``Q * K``.
        mask_threshold: probability above which a pixel belongs to a mask.

    Returns:
        One dict per image, on CPU and detached, sorted by descending score: ``"masks"`` bool ``(N, H, W)``,
        ``"scores"`` float32 ``(N,)`` and ``"labels"`` int64 ``(N,)`` with ``N = min(top_k, Q * K)``.

    Raises:
        TypeError: when the logits are not tensors.
        ValueError: on inconsistent shapes or invalid ``target_size``, ``top_k`` or ``mask_threshold``.
    """
    for name, value, ndim, shape in (
        ("class_queries_logits", class_queries_logits, 3, "(B, Q, K + 1)"),
        ("masks_queries_logits", masks_queries_logits, 4, "(B, Q, h, w)"),
    ):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor of shape {shape}, got {_describe(value)}.")
        if value.ndim != ndim:
            raise ValueError(f"`{name}` must have shape {shape}, got {_describe(value)}.")
    batch_size, num_queries, num_classes_plus_one = class_queries_logits.shape
    if tuple(masks_queries_logits.shape[:2]) != (batch_size, num_queries):
        raise ValueError(
            f"`class_queries_logits` {_describe(class_queries_logits)} and `masks_queries_logits` "
            f"{_describe(masks_queries_logits)} must agree on batch size and number of queries (the first two dims). "
            f"Pass the two logits of the same model output."
        )
    if num_classes_plus_one < 2:
        raise ValueError(
            f"`class_queries_logits` needs at least one class plus the 'no object' class in its last dim, got "
            f"{_describe(class_queries_logits)}."
        )
    if (
        not isinstance(target_size, Sequence)
        or len(target_size) != 2
        or not all(_is_int(side) and side > 0 for side in target_size)
    ):
        raise ValueError(
            f"`target_size` must be (height, width), two positive ints, got {target_size!r}. "
            f"Pass e.g. `tuple(pixel_values.shape[-2:])`."
        )
    top_k = _check_positive_int(top_k, "top_k")
    if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, numbers.Real) or not 0 <= mask_threshold < 1:
        raise ValueError(
            f"`mask_threshold` must be a probability in [0, 1), got {mask_threshold!r}. Mask2Former uses 0.5."
        )
    height, width = int(target_size[0]), int(target_size[1])
    num_classes = num_classes_plus_one - 1
    k = min(top_k, num_queries * num_classes)
    chunk = max(1, _UPSAMPLE_CHUNK_PIXELS // (height * width))

    results = []
    for image in range(batch_size):
        probs = class_queries_logits[image].detach().float().softmax(-1)[:, :-1]
        class_scores, flat_index = probs.flatten().topk(k)
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        # Upsample each selected query once, even when it is kept with several classes.
        queries, inverse = torch.unique(query_index, return_inverse=True)
        query_masks, query_mask_scores = [], []
        for start in range(0, queries.numel(), chunk):
            logits = masks_queries_logits[image, queries[start : start + chunk]].detach().float()
            mask_probs = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            mask_probs = mask_probs.sigmoid_()
            binary = mask_probs > mask_threshold
            area = binary.flatten(1).sum(1)
            inside = (mask_probs * binary).flatten(1).sum(1)
            query_masks.append(binary)
            query_mask_scores.append(torch.where(area > 0, inside / area.clamp(min=1), torch.zeros_like(inside)))
        masks = torch.cat(query_masks)[inverse]
        scores = class_scores * torch.cat(query_mask_scores)[inverse]
        scores, order = torch.sort(scores, descending=True, stable=True)
        results.append({"masks": masks[order].cpu(), "scores": scores.cpu(), "labels": labels[order].long().cpu()})
    return results


class CocoMaskAP:
    """COCO mask AP/AR of instance predictions, accumulated image by image.

    :meth:`add` validates one image, RLE-encodes its predicted and ground-truth masks (so only a few bytes per mask
    are kept) and stores them as a picklable *record*; :meth:`compute` builds the COCO ground truth and results of
    all records and runs ``pycocotools``' ``COCOeval(iouType="segm")``.

    Records can be moved between processes: :meth:`encode` makes one without storing it, :meth:`encoded_records`
    returns the stored ones and :meth:`add_encoded` adds records made elsewhere. Image ids are assigned in
    :meth:`compute` (record order), so records gathered from several processes never clash.

    Ground truth: ``area`` is the pixel count, ``bbox`` comes from the mask and ``iscrowd`` is 0. Empty ground-truth
    masks (e.g. an instance cropped away by an augmentation) are dropped: nothing can ever match them.

    Example:
        >>> metric = CocoMaskAP(model.config.id2label)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     predictions = post_process_instance_predictions(...)
        ...     metric.update(predictions, batch["mask_labels"], batch["class_labels"])
        >>> metric.compute()["map"]  # doctest: +SKIP

    Args:
        id2label: 0-based class id -> name (without Mask2Former's "no object" class).
        max_detections: the largest of COCOeval's ``maxDets = [1, 10, max_detections]`` (>= 10). It is applied per
            image and class. The ``map*`` values and ``mar_100`` are computed at this cap, whatever its value
            (``mar_100`` keeps torchmetrics' name).
    """

    def __init__(self, id2label: Mapping[Any, str], *, max_detections: int = 100) -> None:
        self.id2label = _check_id2label(id2label)
        if not _is_int(max_detections) or max_detections < 10:
            raise ValueError(
                f"`max_detections` must be an int >= 10 (COCOeval uses maxDets = [1, 10, max_detections] and the "
                f"metric names `mar_1`, `mar_10` rely on it), got {max_detections!r}. COCO's default is 100."
            )
        self.max_detections = int(max_detections)
        self._records: list[dict[str, Any]] = []

    @property
    def num_images(self) -> int:
        """Number of images (records) accumulated so far."""
        return len(self._records)

    def encode(self, predictions: Mapping[str, Any], target_masks: Any, target_labels: Any) -> dict[str, Any]:
        """Validate one image and return its encoded record, without storing it.

        Args: see :meth:`add`.

        Returns:
            A picklable dict with the image ``height`` and ``width``, the predictions' ``pred_segmentations``
            (compressed RLEs), ``pred_scores`` and ``pred_labels`` and the ground truth's ``gt_segmentations``,
            ``gt_labels``, ``gt_areas`` and ``gt_bboxes`` (plain python lists; labels are 0-based class ids).
        """
        return self._encode(predictions, target_masks, target_labels, where="")

    def _encode(
        self, predictions: Mapping[str, Any], target_masks: Any, target_labels: Any, where: str
    ) -> dict[str, Any]:
        if not isinstance(predictions, Mapping):
            raise TypeError(
                f"`predictions{where}` must be a dict with 'masks', 'scores' and 'labels', got "
                f"{_describe(predictions)}. Use the output of `post_process_instance_predictions`."
            )
        missing = [key for key in ("masks", "scores", "labels") if key not in predictions]
        if missing:
            raise ValueError(
                f"`predictions{where}` lacks the keys {missing}; it has {sorted(map(str, predictions))}. "
                f"Use the output of `post_process_instance_predictions`."
            )
        pred_masks = _binary_masks(predictions["masks"], f"predictions{where}['masks']")
        num_predictions = pred_masks.shape[0]
        pred_scores = _score_array(predictions["scores"], f"predictions{where}['scores']", num_predictions)
        pred_labels = _label_array(
            predictions["labels"], f"predictions{where}['labels']", num_predictions, self.id2label
        )
        gt_masks = _binary_masks(target_masks, f"target_masks{where}")
        gt_labels = _label_array(target_labels, f"target_labels{where}", gt_masks.shape[0], self.id2label)
        if pred_masks.shape[1:] != gt_masks.shape[1:]:
            raise ValueError(
                f"Predicted and target masks{where} must have the same (H, W), got predictions of "
                f"shape {pred_masks.shape} and targets of shape {gt_masks.shape}. Post-process the predictions to "
                f"the label size (`target_size=target_masks.shape[-2:]`)."
            )
        keep = gt_masks.any(axis=(1, 2))
        gt_masks, gt_labels = gt_masks[keep], gt_labels[keep]

        mask_utils, _, _ = _import_pycocotools()
        gt_rles = _encode_masks(gt_masks)
        return {
            "height": int(gt_masks.shape[1]),
            "width": int(gt_masks.shape[2]),
            "pred_segmentations": _encode_masks(pred_masks),
            "pred_scores": pred_scores.tolist(),
            "pred_labels": pred_labels.tolist(),
            "gt_segmentations": gt_rles,
            "gt_labels": gt_labels.tolist(),
            "gt_areas": [int(area) for area in mask_utils.area(gt_rles)] if gt_rles else [],
            "gt_bboxes": mask_utils.toBbox(gt_rles).tolist() if gt_rles else [],
        }

    def add(self, predictions: Mapping[str, Any], target_masks: Any, target_labels: Any) -> None:
        """Add one image.

        Args:
            predictions: ``{"masks": (N, H, W) bool/0-1, "scores": (N,), "labels": (N,) int}`` tensors or arrays,
                e.g. one entry of :func:`post_process_instance_predictions`.
            target_masks: ``(M, H, W)`` binary ground-truth masks (bool, 0/1 int or 0/1 float); ``(0, H, W)`` for an
                image without instances.
            target_labels: ``(M,)`` integer class ids, keys of ``id2label``.

        Raises:
            ValueError: on mismatched shapes (masks of different sizes, wrong lengths), non-binary masks or labels
                outside ``id2label``.
            TypeError: on inputs of the wrong type.
        """
        self._records.append(self._encode(predictions, target_masks, target_labels, where=""))

    def update(
        self, predictions: Sequence[Mapping[str, Any]], target_masks: Sequence[Any], target_labels: Sequence[Any]
    ) -> None:
        """Add a batch: lists with one entry per image (see :meth:`add`). A bad image leaves the metric unchanged."""
        for name, value in (
            ("predictions", predictions),
            ("target_masks", target_masks),
            ("target_labels", target_labels),
        ):
            if isinstance(value, (Mapping, str)) or not isinstance(value, (Sequence, torch.Tensor, np.ndarray)):
                raise TypeError(
                    f"`{name}` must be a list with one entry per image, got {_describe(value)}. Use `add` for a "
                    f"single image."
                )
        lengths = (len(predictions), len(target_masks), len(target_labels))
        if len(set(lengths)) != 1:
            raise ValueError(
                f"`predictions`, `target_masks` and `target_labels` must hold the same number of images, got "
                f"{lengths[0]}, {lengths[1]} and {lengths[2]}."
            )
        records = [
            self._encode(prediction, masks, labels, where=f"[{index}]")
            for index, (prediction, masks, labels) in enumerate(zip(predictions, target_masks, target_labels))
        ]
        self._records.extend(records)

    def add_encoded(self, record: Mapping[str, Any]) -> None:
        """Add a record made by :meth:`encode` (possibly in another process, e.g. after ``gather_object``)."""
        if not isinstance(record, Mapping):
            raise TypeError(f"`record` must be a dict made by `CocoMaskAP.encode`, got {_describe(record)}.")
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(
                f"`record` lacks the keys {missing}; it has {sorted(map(str, record))}. Make records with "
                f"`CocoMaskAP.encode` (or take them from `encoded_records()`)."
            )
        num_predictions = len(record["pred_segmentations"])
        num_targets = len(record["gt_segmentations"])
        lengths = {
            "pred_scores": (len(record["pred_scores"]), num_predictions),
            "pred_labels": (len(record["pred_labels"]), num_predictions),
            "gt_labels": (len(record["gt_labels"]), num_targets),
            "gt_areas": (len(record["gt_areas"]), num_targets),
            "gt_bboxes": (len(record["gt_bboxes"]), num_targets),
        }
        wrong = {key: got for key, (got, expected) in lengths.items() if got != expected}
        if wrong:
            raise ValueError(
                f"`record` is inconsistent: {num_predictions} predicted and {num_targets} target segmentations, but "
                f"lengths {wrong}. Make records with `CocoMaskAP.encode`."
            )
        bad = sorted({label for label in [*record["pred_labels"], *record["gt_labels"]] if label not in self.id2label})
        if bad:
            raise ValueError(
                f"`record` holds class ids that are not in `id2label`: {bad[:10]}; valid ids are "
                f"{sorted(self.id2label)[:20]}. Were the records made with a different `id2label`?"
            )
        self._records.append(dict(record))

    def encoded_records(self) -> list[dict[str, Any]]:
        """The stored records (a new list), e.g. to gather them across processes."""
        return list(self._records)

    def reset(self) -> None:
        """Forget all images, e.g. between evaluation runs."""
        self._records.clear()

    def _coco_eval(self, verbose: bool = False) -> Any:
        """Build the COCO ground truth and results of all records and run ``COCOeval`` (evaluate + accumulate)."""
        _, COCO, COCOeval = _import_pycocotools()
        images, annotations, detections = [], [], []
        for index, record in enumerate(self._records):
            image_id = index + 1
            images.append({"id": image_id, "height": record["height"], "width": record["width"]})
            for rle, label, area, bbox in zip(
                record["gt_segmentations"], record["gt_labels"], record["gt_areas"], record["gt_bboxes"]
            ):
                annotations.append(
                    {
                        # Ids start at 1: COCOeval stores the matched ground truth's id and reads 0 as "unmatched".
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(label) + 1,
                        "segmentation": rle,
                        "area": area,
                        "bbox": list(bbox),
                        "iscrowd": 0,
                    }
                )
            for rle, score, label in zip(record["pred_segmentations"], record["pred_scores"], record["pred_labels"]):
                detections.append(
                    {"image_id": image_id, "category_id": int(label) + 1, "segmentation": rle, "score": float(score)}
                )
        categories = [{"id": class_id + 1, "name": name} for class_id, name in self.id2label.items()]

        output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with output:
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
            coco_gt.createIndex()
            if detections:
                coco_dt = coco_gt.loadRes(detections)
            else:
                # `COCO.loadRes([])` fails (it reads `anns[0]`); an empty result set is built by hand instead.
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(images), "annotations": [], "categories": list(categories)}
                coco_dt.createIndex()
            coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
            coco_eval.params.maxDets = [1, 10, self.max_detections]
            coco_eval.evaluate()
            coco_eval.accumulate()
            if verbose:
                coco_eval.summarize()
        return coco_eval

    def compute(self, *, verbose: bool = False) -> dict[str, Any]:
        """COCO mask AP/AR over all accumulated images.

        Args:
            verbose: print pycocotools' progress and ``COCOeval.summarize()`` table. (pycocotools' table computes
                its first AP line at maxDets=100 only, so it shows -1 there when ``max_detections != 100``; the
                returned values do not have that problem.)

        Returns:
            A dict with the floats ``map`` (AP at IoU .50:.05:.95, all areas), ``map_50``, ``map_75``,
            ``map_small``, ``map_medium``, ``map_large``, ``mar_1``, ``mar_10``, ``mar_100`` (AR at
            ``max_detections``), ``mar_small``, ``mar_medium``, ``mar_large``; ``map_per_class``, a dict
            ``{label name: AP}``; and the ints ``num_images``, ``num_predictions`` and ``num_targets``. Values
            pycocotools cannot define (no ground truth in that area range or class) are ``-1.0``.

        Raises:
            ValueError: when nothing was added or the images hold no ground-truth instance (AP is undefined).
        """
        num_targets = sum(len(record["gt_labels"]) for record in self._records)
        if num_targets == 0:
            raise ValueError(
                f"No ground-truth instances in the {len(self._records)} image(s) added: AP is undefined without "
                f"ground truth. Add images with at least one non-empty target mask (`add`/`update`) before `compute`."
            )
        coco_eval = self._coco_eval(verbose=verbose)
        params = coco_eval.params
        precision = coco_eval.eval["precision"]  # (iouThrs, recThrs, classes, areas, maxDets); -1 where undefined
        recall = coco_eval.eval["recall"]  # (iouThrs, classes, areas, maxDets)
        areas = {label: index for index, label in enumerate(params.areaRngLbl)}

        def mean_defined(values: np.ndarray) -> float:
            values = values[values > -1]
            return float(values.mean()) if values.size else -1.0

        # Computed here rather than read from `coco_eval.stats`: summarize() looks the overall AP up at maxDets=100
        # whatever `params.maxDets` is, and compares IoU thresholds with `==`.
        result: dict[str, Any] = {}
        for key, is_ap, iou, area, max_det in _SUMMARY:
            values = precision if is_ap else recall
            if iou is not None:
                values = values[np.flatnonzero(np.isclose(params.iouThrs, iou))]
            result[key] = mean_defined(values[..., areas[area], max_det])
        result["map_per_class"] = {
            self.id2label[int(category_id) - 1]: mean_defined(precision[:, :, k, areas["all"], -1])
            for k, category_id in enumerate(params.catIds)
        }
        result["num_images"] = len(self._records)
        result["num_predictions"] = sum(len(record["pred_labels"]) for record in self._records)
        result["num_targets"] = num_targets
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={len(self.id2label)}, max_detections={self.max_detections}, "
            f"num_images={self.num_images})"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _instance_logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class_queries_logits, masks_queries_logits)`` of a Mask2Former-style output (ModelOutput, object, dict)."""
    logits = []
    for name in ("class_queries_logits", "masks_queries_logits"):
        value = getattr(outputs, name, None)
        if value is None and isinstance(outputs, Mapping):
            value = outputs.get(name)
        if value is None:
            raise TypeError(
                f"The model output has no `{name}`: got {type(outputs).__name__}. Instance evaluation needs a "
                f"Mask2Former-style model returning `class_queries_logits` (B, Q, K + 1) and `masks_queries_logits` "
                f"(B, Q, h, w)."
            )
        logits.append(value)
    return logits[0], logits[1]


def _batch_items(batch: Any, index: int) -> tuple[torch.Tensor, Sequence[Any], Sequence[Any]]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"Batch {index} must be a dict with 'pixel_values', 'mask_labels' and 'class_labels', got "
            f"{_describe(batch)}. Use a Mask2Former collate function."
        )
    missing = [key for key in ("pixel_values", "mask_labels", "class_labels") if key not in batch]
    if missing:
        raise ValueError(
            f"Batch {index} lacks the keys {missing}; it has {sorted(map(str, batch))}. Instance evaluation needs "
            f"'pixel_values' (B, C, H, W), 'mask_labels' (B lists of (M, H, W) masks) and 'class_labels'."
        )
    pixel_values = batch["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        raise ValueError(
            f"Batch {index}: 'pixel_values' must be a (B, C, H, W) tensor, got {_describe(pixel_values)}."
        )
    mask_labels, class_labels = batch["mask_labels"], batch["class_labels"]
    batch_size = pixel_values.shape[0]
    if len(mask_labels) != batch_size or len(class_labels) != batch_size:
        raise ValueError(
            f"Batch {index}: 'mask_labels' and 'class_labels' must hold one entry per image ({batch_size}), got "
            f"{len(mask_labels)} and {len(class_labels)}."
        )
    return pixel_values, mask_labels, class_labels


@torch.no_grad()
def evaluate_instance_segmentation(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    id2label: Mapping[Any, str],
    *,
    device: torch.device | str | None = None,
    top_k: int = 100,
    mask_threshold: float = 0.5,
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """COCO mask AP of a Mask2Former-style model (or a peft model wrapping one) over a dataloader.

    Each batch is run as ``model(pixel_values=batch["pixel_values"])``; the predictions are post-processed with
    :func:`post_process_instance_predictions` to the ``(H, W)`` of ``pixel_values`` and scored against
    ``batch["mask_labels"]`` (per image ``(M, H, W)`` masks) and ``batch["class_labels"]`` (per image ``(M,)``).
    The model is put in eval mode and back in its previous mode afterwards.

    Args:
        model: returns an output with ``class_queries_logits`` and ``masks_queries_logits``.
        dataloader: yields dicts with ``pixel_values``, ``mask_labels`` and ``class_labels``.
        id2label: 0-based class id -> name, e.g. ``model.config.id2label``.
        device: where ``pixel_values`` are sent; default: the device of the model's first parameter.
        top_k: (query, class) pairs kept per image.
        mask_threshold: mask probability threshold.
        gather: for distributed evaluation: called after every batch with this process's encoded image records of
            the batch (picklable dicts, see :meth:`CocoMaskAP.encode`); it must return the records of all
            processes. With accelerate, ``lambda r: accelerator.gather_for_metrics(r, use_gather_object=True)``
            also drops the samples that the distributed sampler repeated to even out the last batch (plain
            ``gather_object`` would count them twice).

    Returns:
        The dict of :meth:`CocoMaskAP.compute`.
    """
    metric = CocoMaskAP(id2label)
    if gather is not None and not callable(gather):
        raise TypeError(
            f"`gather` must be a callable (e.g. accelerate's `gather_object`) or None, got {_describe(gather)}."
        )
    device = _model_device(model) if device is None else torch.device(device)

    records: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        for batch_index, batch in enumerate(dataloader):
            pixel_values, mask_labels, class_labels = _batch_items(batch, batch_index)
            class_logits, mask_logits = _instance_logits(model(pixel_values=pixel_values.to(device)))
            predictions = post_process_instance_predictions(
                class_logits,
                mask_logits,
                tuple(pixel_values.shape[-2:]),
                top_k=top_k,
                mask_threshold=mask_threshold,
            )
            batch_records = [
                metric._encode(prediction, masks, labels, where=f" (batch {batch_index}, image {image_index})")
                for image_index, (prediction, masks, labels) in enumerate(zip(predictions, mask_labels, class_labels))
            ]
            if gather is not None:
                batch_records = gather(batch_records)
                if not isinstance(batch_records, (list, tuple)):
                    raise TypeError(
                        f"`gather` must return the list of records of all processes, got {_describe(batch_records)}."
                        " Use e.g. `lambda r: accelerator.gather_for_metrics(r, use_gather_object=True)`."
                    )
            records.extend(batch_records)
    finally:
        model.train(was_training)

    for record in records:
        metric.add_encoded(record)
    return metric.compute()
