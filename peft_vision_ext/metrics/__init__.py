# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Segmentation metrics: mean IoU, balanced accuracy (per-class recall) and pixel accuracy for semantic segmentation;
COCO mask AP for instance segmentation.

- :mod:`~peft_vision_ext.metrics.functional`: numpy functions and a streaming :class:`ConfusionMatrix`.
- :mod:`~peft_vision_ext.metrics.trainer`: ``compute_metrics`` / ``preprocess_logits_for_metrics`` for
  ``transformers.Trainer``.
- ``segmentation_metrics/``: the same metrics as an ``evaluate`` module, loadable offline with
  :func:`load_segmentation_metric`.
- :mod:`~peft_vision_ext.metrics.instance`: COCO-protocol mask AP (pycocotools) of Mask2Former-style instance
  predictions: :func:`post_process_instance_predictions`, the accumulating :class:`CocoMaskAP` and
  :func:`evaluate_instance_segmentation`.
"""

from __future__ import annotations

import os
from typing import Any

from peft_vision_ext.metrics.functional import (
    ConfusionMatrix,
    compute_segmentation_metrics,
    confusion_matrix,
    metrics_from_confusion,
)
from peft_vision_ext.metrics.instance import (
    CocoMaskAP,
    evaluate_instance_segmentation,
    post_process_instance_predictions,
)
from peft_vision_ext.metrics.trainer import make_compute_metrics, preprocess_logits_for_metrics


__all__ = [
    "SEGMENTATION_METRIC_PATH",
    "CocoMaskAP",
    "ConfusionMatrix",
    "compute_segmentation_metrics",
    "confusion_matrix",
    "evaluate_instance_segmentation",
    "load_segmentation_metric",
    "make_compute_metrics",
    "metrics_from_confusion",
    "post_process_instance_predictions",
    "preprocess_logits_for_metrics",
]

SEGMENTATION_METRIC_PATH: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "segmentation_metrics")
"""Absolute path of the ``evaluate`` metric directory shipped with the package; ``evaluate.load`` reads it locally."""


def load_segmentation_metric(**kwargs: Any) -> Any:
    """``evaluate.load`` the packaged segmentation metric; works offline, as the script is a local file.

    Args:
        **kwargs: forwarded to ``evaluate.load`` (e.g. ``experiment_id``, ``keep_in_memory``, ``cache_dir``).

    Returns:
        The ``SegmentationMetrics`` ``evaluate.Metric`` instance.
    """
    # Imported here: `evaluate` (and `datasets` behind it) is slow to import and only this function needs it.
    import evaluate

    return evaluate.load(SEGMENTATION_METRIC_PATH, **kwargs)
