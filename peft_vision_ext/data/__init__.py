"""Embedded, procedurally generated segmentation data (no downloads).

See :mod:`peft_vision_ext.data.rocks` for the rock-field domains (synthetic Moon source, real-looking Moon, Mars,
high-sun Moon) and :mod:`peft_vision_ext.data.transforms` for tensor conversion and collation.
"""

from __future__ import annotations

from .rocks import (
    ROCK_DOMAINS,
    ROCK_IGNORE_INDEX,
    ROCK_LABELS,
    ROCK_SPLITS,
    load_rock_dataset,
    load_rock_datasets,
    render_rock_scene,
)
from .transforms import SegmentationTransform, collate_segmentation


__all__ = [
    "ROCK_DOMAINS",
    "ROCK_IGNORE_INDEX",
    "ROCK_LABELS",
    "ROCK_SPLITS",
    "SegmentationTransform",
    "collate_segmentation",
    "load_rock_dataset",
    "load_rock_datasets",
    "render_rock_scene",
]
