"""Embedded, procedurally generated segmentation data (no downloads).

See :mod:`peft_vision_ext.data.rocks` for the rock-field domains (synthetic Moon source, real-looking Moon, Mars,
high-sun Moon), :mod:`peft_vision_ext.data.rock_instances` for the same scenes with per-rock masks and
classes, :mod:`peft_vision_ext.data.transforms` for tensor conversion and collation, and
:mod:`peft_vision_ext.data.rock_folders` to write the scenes to disk as a folder dataset (``peft-vision write-rocks``).
"""

from __future__ import annotations

from .rock_folders import write_rock_folders
from .rock_instances import (
    BOULDER_RADIUS,
    MAX_INSTANCES,
    ROCK_INSTANCE_LABELS,
    load_rock_instance_dataset,
    render_rock_instances,
)
from .rocks import (
    ROCK_DOMAINS,
    ROCK_IGNORE_INDEX,
    ROCK_LABELS,
    ROCK_SPLITS,
    load_rock_dataset,
    load_rock_datasets,
    render_rock_scene,
)
from .transforms import (
    InstanceSegmentationTransform,
    SegmentationTransform,
    collate_instance_segmentation,
    collate_segmentation,
)


__all__ = [
    "BOULDER_RADIUS",
    "MAX_INSTANCES",
    "ROCK_DOMAINS",
    "ROCK_IGNORE_INDEX",
    "ROCK_INSTANCE_LABELS",
    "ROCK_LABELS",
    "ROCK_SPLITS",
    "InstanceSegmentationTransform",
    "SegmentationTransform",
    "collate_instance_segmentation",
    "collate_segmentation",
    "load_rock_dataset",
    "load_rock_datasets",
    "load_rock_instance_dataset",
    "render_rock_instances",
    "render_rock_scene",
    "write_rock_folders",
]
