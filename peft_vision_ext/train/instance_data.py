# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Data for ``peft-vision train --task instance``: COCO instances files with their image folders, or the embedded
rock instances; the label set is the COCO categories (or the embedded ones).

Every source ends as ``datasets.Dataset`` splits read by
:class:`~peft_vision_ext.data.fixed_size.FixedSizeInstanceTransform`: columns ``image`` (a path) plus
``segmentation`` (the JSON text of the image's segmentations) and ``classes`` for COCO, or ``instance_map`` and
``instance_classes`` for the embedded data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..data.coco import CocoInstances, read_coco_instances, scan_coco_instances
from .arguments import UsageError
from .data import (
    EMBEDDED_PREFIX,
    check_data_args,
    embedded_splits,
    hold_out,
    subset,
)


@dataclass
class InstanceSplits:
    """The splits of one run and what the up-front check found."""

    train: Any  # datasets.Dataset
    validation: Any
    test: Any | None
    source: str
    id2label: dict[int, str]
    id2label_origin: str
    max_side: int = 0
    instances: dict[str, int] = field(default_factory=dict)  # split -> instances with pixels
    validation_held_out: bool = False


def _annotation_file(data_args, split: str) -> tuple[str | None, str | None, str]:
    """``(annotations, image folder, argument)`` of a split; ``(None, None, ...)`` when the split is not given."""
    flag_dir, flag_annotations = f"{split}_dir", f"{split}_annotations"
    directory, annotations = getattr(data_args, flag_dir), getattr(data_args, flag_annotations)
    argument = f"`--{flag_annotations if annotations else flag_dir}` {annotations or directory!r}"
    if annotations is None and directory is None:
        return None, None, argument
    if annotations is None:
        if not os.path.isdir(directory):
            what = "is a file, not a folder" if os.path.exists(directory) else "does not exist"
            raise FileNotFoundError(f"`--{flag_dir}` {directory!r} {what}. Pass the folder of the images.")
        default = os.path.join(directory, "annotations.json")
        candidates = [default] if os.path.isfile(default) else [
            os.path.join(directory, name) for name in sorted(os.listdir(directory)) if name.endswith(".json")
        ]  # fmt: skip
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"`--{flag_dir}` {directory!r}: --task instance reads a COCO instances JSON, and the folder holds "
                f"{'several' if candidates else 'none'} ({[os.path.basename(c) for c in candidates][:4]}). Pass "
                f"`--{flag_annotations}`, or name it annotations.json."
            )
        annotations = candidates[0]
    return annotations, directory, argument


def _coco_dataset(instances: CocoInstances):
    import datasets

    return datasets.Dataset.from_dict(
        {
            "image": instances.images,
            "segmentation": [json.dumps(s) for s in instances.segmentations],
            "classes": instances.classes,
            "name": [os.path.basename(path) for path in instances.images],
        }
    )


def _coco_splits(data_args, seed: int) -> InstanceSplits:
    read: dict[str, CocoInstances] = {}
    arguments = {}
    for split in ("train", "validation", "test"):
        annotations, directory, argument = _annotation_file(data_args, split)
        if annotations is None:
            continue
        read[split] = read_coco_instances(annotations, directory, argument=argument)
        arguments[split] = argument
    categories = read["train"].categories
    for split, instances in read.items():
        if instances.categories != categories:
            raise ValueError(
                f"{arguments[split]} defines the categories {instances.categories}, the training data "
                f"{categories}; every split needs the same ones (ids and names)."
            )
    if data_args.id2label is not None:
        raise UsageError(
            "`--id2label`: with COCO annotations the categories name the classes; drop --id2label (rename the "
            "categories in the JSON file instead)."
        )
    splits = {split: _coco_dataset(instances) for split, instances in read.items()}
    held_out = "validation" not in splits
    if held_out:
        splits["train"], splits["validation"] = hold_out(
            splits["train"], data_args.validation_split_fraction, seed, arguments["train"]
        )
    splits["train"] = subset(splits["train"], data_args.max_train_samples, seed)
    for split in ("validation", "test"):
        if split in splits:
            splits[split] = subset(splits[split], data_args.max_eval_samples, seed)
    out = InstanceSplits(
        splits["train"],
        splits["validation"],
        splits.get("test"),
        read["train"].annotation_file,
        read["train"].id2label,
        "the COCO categories",
        validation_held_out=held_out,
    )
    for split, dataset in splits.items():
        source = read["train" if split == "validation" and held_out else split]
        kept = CocoInstances(source.annotation_file, source.categories)
        rows = {path: row for row, path in enumerate(source.images)}
        for path in dataset["image"]:
            row = rows[path]
            kept.images.append(path)
            kept.heights.append(source.heights[row])
            kept.widths.append(source.widths[row])
            kept.segmentations.append(source.segmentations[row])
            kept.classes.append(source.classes[row])
        argument = arguments["train"] + " (held out for validation)" if split == "validation" and held_out else None
        scan = scan_coco_instances(kept, argument=argument or arguments[split])
        out.max_side = max(out.max_side, scan.max_side)
        out.instances[split] = scan.instances
    return out


def _embedded_splits(data_args, seed: int) -> InstanceSplits:
    from ..data import ROCK_INSTANCE_LABELS

    domain, size, splits, held_out = embedded_splits(data_args, "rock_instances", seed)
    out = InstanceSplits(
        splits["train"],
        splits["validation"],
        splits["test"],
        f"peft-vision-ext rock instances ({domain})",
        dict(ROCK_INSTANCE_LABELS),
        "the dataset",
        max_side=size,
        validation_held_out=held_out,
    )
    out.instances = {split: sum(len(c) for c in dataset["instance_classes"]) for split, dataset in splits.items()}
    return out


def load_instance_splits(data_args, seed: int) -> InstanceSplits:
    """The splits of the COCO files (``--train_annotations`` / ``--train_dir`` and the validation and test ones) or
    of ``--dataset_name embedded:rock_instances/<domain>``, every image read and every mask decoded once."""
    check_data_args(data_args)
    if data_args.dataset_name:
        if not data_args.dataset_name.startswith(EMBEDDED_PREFIX):
            raise UsageError(
                f"`--dataset_name` {data_args.dataset_name!r}: --task instance reads COCO annotations "
                "(--train_annotations / --train_dir) or 'embedded:rock_instances/<domain>'."
            )
        splits = _embedded_splits(data_args, seed)
    else:
        splits = _coco_splits(data_args, seed)
    for split, count in splits.instances.items():
        if count == 0:
            raise ValueError(
                f"The {split} data holds no instance with pixels (after --max_*_samples and crowd annotations are "
                f"skipped): there is nothing to {'learn' if split == 'train' else 'score'}. Check the annotations"
                f"{', or raise --max_eval_samples' if split != 'train' else ''}."
            )
    return splits
