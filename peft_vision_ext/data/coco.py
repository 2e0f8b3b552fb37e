# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Instance annotations in COCO's format: read, check and decode them (``pycocotools``).

A COCO instances file (``instances_train2017.json`` and the like) lists ``images`` (``id``, ``file_name``, ``height``,
``width``), ``categories`` (``id``, ``name``) and ``annotations`` (``image_id``, ``category_id``, ``segmentation``
as polygons or RLE, ``iscrowd``). :func:`read_coco_instances` resolves every ``file_name`` against an image folder,
maps the category ids (any, e.g. COCO's 1..90 with gaps) to class ids ``0..K-1`` in id order, and refuses what would
fail later (missing images, unknown images or categories, unusable segmentations), naming a few offenders.
Crowd annotations (``iscrowd: 1``) are skipped: Mask2Former's loss has no ignore region for them.
:func:`scan_coco_instances` then reads every image and decodes every mask once, before training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .folders import _names, image_to_rgb8, open_image


__all__ = ["CocoInstances", "decode_instance_masks", "read_coco_instances", "scan_coco_instances"]


@dataclass
class CocoInstances:
    """One COCO instances file, resolved: per image its path, declared size, segmentations and class ids."""

    annotation_file: str
    categories: dict[int, str]  # COCO category id -> name, in id order
    images: list[str] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    segmentations: list[list[Any]] = field(default_factory=list)  # per image: polygons or RLE, one per instance
    classes: list[list[int]] = field(default_factory=list)  # per image: class ids 0..K-1
    crowd_skipped: int = 0

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.categories.values()))

    def __len__(self) -> int:
        return len(self.images)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve(file_name: str, folders: Sequence[str]) -> str | None:
    for folder in folders:
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    return None


def _check_segmentation(segmentation: Any) -> str | None:
    """Why ``segmentation`` is unusable, or None: polygons (lists of >= 3 points) or an RLE dict."""
    if isinstance(segmentation, dict):
        if "counts" in segmentation and "size" in segmentation:
            return None
        return "an RLE segmentation needs 'counts' and 'size'"
    if isinstance(segmentation, list) and segmentation:
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "a polygon must be a flat list of at least 3 x, y points"
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
                return "polygon coordinates must be numbers"
        return None
    return "no polygon and no RLE"


def read_coco_instances(
    annotation_file: str | os.PathLike, image_dir: str | os.PathLike | None = None, *, argument: str
) -> CocoInstances:
    """Read a COCO instances file; each ``file_name`` is looked up in ``image_dir`` (default: the file's folder),
    then in its ``images/`` subfolder.

    Raises:
        FileNotFoundError: the file, the image folder or images it names are missing (a few are named).
        ValueError: not COCO JSON, duplicate ids, annotations of unknown images or categories, unusable
            segmentations, or no category.
    """
    annotation_file = os.fspath(annotation_file)
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"{argument}: the COCO annotation file {annotation_file!r} does not exist.")
    try:
        with open(annotation_file, encoding="utf-8") as handle:
            coco = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{argument}: {annotation_file!r} is not readable JSON ({' '.join(str(exc).split())})."
        ) from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(key), list) for key in ("images", "categories")):
        raise ValueError(
            f"{argument}: {annotation_file!r} is not a COCO instances file: it needs lists 'images', 'categories' and "
            "'annotations'."
        )
    image_dir = os.fspath(image_dir) if image_dir is not None else os.path.dirname(os.path.abspath(annotation_file))
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{argument}: the image folder {image_dir!r} does not exist.")
    folders = [image_dir, os.path.join(image_dir, "images")]

    categories: dict[int, str] = {}
    for category in coco["categories"]:
        if (
            not isinstance(category, dict)
            or not _is_int(category.get("id"))
            or not isinstance(category.get("name"), str)
        ):
            raise ValueError(f"{argument}: every category needs an int 'id' and a 'name', got {category!r}.")
        if category["id"] in categories:
            raise ValueError(f"{argument}: category id {category['id']} appears twice.")
        categories[category["id"]] = category["name"]
    if not categories:
        raise ValueError(f"{argument}: {annotation_file!r} defines no category; instance segmentation needs classes.")
    names = list(categories.values())
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{argument}: several categories are named {duplicates}; give each its own name.")
    categories = dict(sorted(categories.items()))
    class_of = {category_id: index for index, category_id in enumerate(categories)}

    out = CocoInstances(os.path.abspath(annotation_file), categories)
    row_of: dict[int, int] = {}
    missing = []
    for image in coco["images"]:
        if not isinstance(image, dict) or not _is_int(image.get("id")) or not isinstance(image.get("file_name"), str):
            raise ValueError(f"{argument}: every image needs an int 'id' and a 'file_name', got {image!r}.")
        if image["id"] in row_of:
            raise ValueError(f"{argument}: image id {image['id']} appears twice.")
        path = _resolve(image["file_name"], folders)
        if path is None:
            missing.append(image["file_name"])
            continue
        row_of[image["id"]] = len(out.images)
        out.images.append(path)
        out.heights.append(int(image.get("height") or 0))
        out.widths.append(int(image.get("width") or 0))
        out.segmentations.append([])
        out.classes.append([])
    if missing:
        raise FileNotFoundError(
            f"{argument}: {len(missing)} image(s) of {os.path.basename(annotation_file)!r} are not in {image_dir!r} "
            f"(or its images/ folder): {_names(missing)}. Pass the image folder, or fix the file names."
        )
    if not out.images:
        raise ValueError(f"{argument}: {annotation_file!r} lists no image.")

    unknown_images, unknown_categories, unusable = [], [], []
    for annotation in coco.get("annotations") or []:
        if not isinstance(annotation, dict):
            raise ValueError(f"{argument}: every annotation must be an object, got {annotation!r}.")
        name = f"annotation {annotation.get('id', '?')}"
        if annotation.get("image_id") not in row_of:
            unknown_images.append(f"{name} (image_id {annotation.get('image_id')!r})")
            continue
        if annotation.get("category_id") not in class_of:
            unknown_categories.append(f"{name} (category_id {annotation.get('category_id')!r})")
            continue
        if annotation.get("iscrowd"):
            out.crowd_skipped += 1
            continue
        problem = _check_segmentation(annotation.get("segmentation"))
        if problem is not None:
            unusable.append(f"{name}: {problem}")
            continue
        row = row_of[annotation["image_id"]]
        out.segmentations[row].append(annotation["segmentation"])
        out.classes[row].append(class_of[annotation["category_id"]])
    if unknown_images:
        raise ValueError(
            f"{argument}: {len(unknown_images)} annotation(s) refer to images the file does not list: "
            f"{_names(unknown_images)}."
        )
    if unknown_categories:
        raise ValueError(
            f"{argument}: {len(unknown_categories)} annotation(s) have a category the file does not define "
            f"({sorted(categories)}): {_names(unknown_categories)}."
        )
    if unusable:
        raise ValueError(f"{argument}: {len(unusable)} annotation(s) have unusable segmentations: {_names(unusable)}.")
    return out


def decode_instance_masks(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """``(N, height, width)`` ``bool`` masks of COCO segmentations (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    masks = np.zeros((len(segmentations), height, width), dtype=bool)
    for index, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons of one instance
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        decoded = mask_utils.decode(rle)
        if decoded.shape != (height, width):
            raise ValueError(
                f"an RLE segmentation of size {list(decoded.shape)} belongs to an image of {height}x{width} pixels"
            )
        masks[index] = decoded.astype(bool)
    return masks


def _check_image(instances: CocoInstances, row: int) -> tuple[str | None, Any]:
    path = instances.images[row]
    name = os.path.basename(path)
    try:
        image = open_image(path)
        width, height = image.size
        image_to_rgb8(image)
    except Exception as exc:  # PIL raises many types
        return "image", f"{name}: {' '.join(str(exc).split())}"
    declared = (instances.heights[row], instances.widths[row])
    if declared != (0, 0) and declared != (height, width):
        return "size", f"{name} (file {width}x{height}, annotations {declared[1]}x{declared[0]})"
    try:
        masks = decode_instance_masks(instances.segmentations[row], height, width)
    except Exception as exc:
        return "mask", f"{name}: {' '.join(str(exc).split())}"
    return None, (max(height, width), int(masks.any(axis=(1, 2)).sum()))  # (N, H, W); N may be 0


@dataclass
class CocoScan:
    """What :func:`scan_coco_instances` found: the largest image side and the instances with pixels."""

    max_side: int = 0
    instances: int = 0


def scan_coco_instances(instances: CocoInstances, *, argument: str, workers: int | None = None) -> CocoScan:
    """Read every image (in full) and decode every mask once; record image sizes from the files.

    Raises:
        ValueError: unreadable images, images whose size differs from the annotations', undecodable masks.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    problems: dict[str, list[str]] = {"image": [], "size": [], "mask": []}
    scan = CocoScan()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row, (problem, detail) in enumerate(pool.map(lambda r: _check_image(instances, r), range(len(instances)))):
            if problem is not None:
                problems[problem].append(detail)
                continue
            side, count = detail
            scan.max_side = max(scan.max_side, side)
            scan.instances += count
            height, width = (instances.heights[row], instances.widths[row])
            if (height, width) == (0, 0):
                image = open_image(instances.images[row])
                instances.widths[row], instances.heights[row] = image.size
    if problems["image"]:
        raise ValueError(f"{argument}: {len(problems['image'])} image(s) cannot be read: {_names(problems['image'])}.")
    if problems["size"]:
        raise ValueError(
            f"{argument}: {len(problems['size'])} image(s) differ in size from their COCO entry: "
            f"{_names(problems['size'])}. Fix 'height'/'width' in the annotation file."
        )
    if problems["mask"]:
        raise ValueError(
            f"{argument}: {len(problems['mask'])} image(s) have masks that do not decode: {_names(problems['mask'])}."
        )
    return scan
