# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""The embedded rock scenes written to disk as a folder dataset: ``peft-vision write-rocks``.

:func:`write_rock_folders` writes the layout ``peft-vision train --train_dir`` reads (see
:mod:`peft_vision_ext.data.folders`)::

    OUT_DIR/id2label.json                 {"0": "ground", "1": "rock", "2": "sky"}
    OUT_DIR/train/images/scene_0000.png   OUT_DIR/train/masks/scene_0000.png
    OUT_DIR/validation/images/...         OUT_DIR/validation/masks/...
    OUT_DIR/test/images/...               OUT_DIR/test/masks/...

Images are RGB PNG (or JPEG); masks are palette PNGs whose palette *index* is the class id of
:data:`~peft_vision_ext.data.ROCK_LABELS` (coloured by :data:`ROCK_PALETTE` in an image viewer). The scenes are
exactly those of :func:`~peft_vision_ext.data.load_rock_dataset` with the same domain, split, size and seed (scene
``i`` of a split is sample ``i``), so ``embedded:rocks/<domain>`` and the folders hold the same data.

With ``instances=True`` the instance scenes of :func:`~peft_vision_ext.data.load_rock_instance_dataset` (other images:
fewer, larger rocks) are written too, for ``--task instance``: ``OUT_DIR/instances/<split>/images/`` and a COCO
instances file ``OUT_DIR/instances/<split>/annotations.json`` (one compressed-RLE annotation per rock, categories
1 ``"rock"`` and 2 ``"boulder"``). Scenes without an annotated rock are left out (file names keep the scene index):
:func:`~peft_vision_ext.data.coco.scan_coco_instances` cannot read an image without annotations, and a scene without
an object teaches instance segmentation little.

The directory is written whole (into a hidden temporary sibling, renamed into place at the end), so an interrupted
run leaves the old ``OUT_DIR`` or none; a non-empty ``OUT_DIR`` is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field

import numpy as np

from .._files import atomic_directory
from .rock_instances import ROCK_INSTANCE_LABELS, render_rock_instances
from .rocks import ROCK_DOMAINS, ROCK_IGNORE_INDEX, ROCK_LABELS, ROCK_SPLITS, _sample_seed, render_rock_scene


__all__ = [
    "ROCK_PALETTE",
    "RockFolders",
    "check_rock_folder_arguments",
    "write_rock_folders",
]

ROCK_PALETTE: dict[int, tuple[int, int, int]] = {
    0: (120, 90, 60),  # ground: brown
    1: (240, 200, 40),  # rock: yellow
    2: (70, 130, 220),  # sky: blue
    ROCK_IGNORE_INDEX: (255, 255, 255),  # ignore (never written by the renderer): white
}
"""Colour of each class id in the palette masks (any other index is black)."""

IMAGE_FORMATS: dict[str, str] = {"png": ".png", "jpeg": ".jpg"}
"""``image_format`` -> file extension of the images (masks are always PNG)."""

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096
JPEG_QUALITY = 95
# COCO category ids of ROCK_INSTANCE_LABELS (COCO numbers categories from 1).
_COCO_CATEGORY = {class_id: class_id + 1 for class_id in ROCK_INSTANCE_LABELS}


@dataclass
class InstanceSplit:
    """The COCO file of one split: ``images`` written, ``empty`` scenes left out (no rock), rocks per class name."""

    images: int
    empty: int
    per_class: dict[str, int]


@dataclass
class RockFolders:
    """What :func:`write_rock_folders` wrote: ``counts`` split -> images (splits of 0 images are not written);
    ``instances`` split -> what its COCO file holds (with ``instances=True``)."""

    path: str
    domain: str
    image_size: int
    image_format: str
    counts: dict[str, int] = field(default_factory=dict)
    instances: dict[str, InstanceSplit] = field(default_factory=dict)
    id2label: dict[int, str] = field(default_factory=lambda: dict(ROCK_LABELS))  # as written to id2label.json

    @property
    def id2label_file(self) -> str:
        return os.path.join(self.path, "id2label.json")

    def split_dir(self, split: str) -> str:
        return os.path.join(self.path, split)

    def instance_dir(self, split: str) -> str:
        return os.path.join(self.path, "instances", split)

    def train_command(self, task: str = "semantic") -> str:
        """The ``peft-vision train`` command line that reads these folders (checkpoint, method and output to fill)."""
        parts = ["peft-vision", "train"]
        if task == "instance":
            parts += ["--task", "instance"]
        parts += ["--model_name_or_path", "<checkpoint>", "--method", "<method>"]
        folder = self.instance_dir if task == "instance" else self.split_dir
        for split in ROCK_SPLITS:
            if self.counts.get(split):
                parts += [f"--{split}_dir", shlex.quote(folder(split))]
        if task != "instance":
            parts += ["--id2label", shlex.quote(self.id2label_file)]
        return " ".join(parts + ["--output_dir", "<output_dir>"])


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_rock_folder_arguments(
    domain: str,
    counts: dict[str, int],
    image_size: int,
    seed: int,
    image_format: str,
    flags: dict[str, str] | None = None,
) -> None:
    """Check the arguments of :func:`write_rock_folders` before anything is rendered.

    ``flags`` names the arguments in the messages (e.g. ``{"train": "`--train`"}``); default: the Python names.

    Raises:
        ValueError: an unknown domain or format, a negative count, no training image (or a single one and no
            validation split to score on), an image size outside [32, 4096], a negative seed.
    """
    flags = flags or {}

    def name(key: str) -> str:
        return flags.get(key, f"`{key}`")

    if domain not in ROCK_DOMAINS:
        raise ValueError(f"{name('domain')} {domain!r} is not a rock domain; choose one of {', '.join(ROCK_DOMAINS)}.")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"{name('image_format')} {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}.")
    for split in ROCK_SPLITS:
        count, least = counts.get(split, 0), 1 if split == "train" else 0
        if not _is_int(count) or count < least:
            raise ValueError(f"{name(split)} must be a number of images >= {least}, got {count!r}.")
    if counts.get("validation", 0) == 0 and counts["train"] < 2:
        raise ValueError(
            f"{name('validation')} 0: `peft-vision train` then holds validation images out of the training images, "
            f"which needs at least 2; got {name('train')} {counts['train']}."
        )
    if not _is_int(image_size) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"{name('image_size')} must be a side length in pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got "
            f"{image_size!r}."
        )
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"{name('seed')} must be an integer >= 0, got {seed!r}.")


def _palette() -> list[int]:
    palette = [0] * (3 * 256)
    for class_id, colour in ROCK_PALETTE.items():
        palette[3 * class_id : 3 * class_id + 3] = colour
    return palette


def _save_image(image: np.ndarray, path: str, image_format: str) -> None:
    from PIL import Image

    if image_format == "jpeg":
        Image.fromarray(image).save(path, quality=JPEG_QUALITY)
    else:
        Image.fromarray(image).save(path)


def _write_semantic_split(directory: str, domain: str, split: str, count: int, size: int, seed: int, fmt: str):
    from PIL import Image

    palette = _palette()
    width = max(4, len(str(count - 1)))
    os.makedirs(os.path.join(directory, "images"))
    os.makedirs(os.path.join(directory, "masks"))
    for index in range(count):
        # The seed stream of load_rock_dataset: scene `index` is its sample `index`.
        image, label = render_rock_scene(domain, np.random.default_rng(_sample_seed(seed, domain, split, index)), size)
        stem = f"scene_{index:0{width}d}"
        _save_image(image, os.path.join(directory, "images", stem + IMAGE_FORMATS[fmt]), fmt)
        mask = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes())
        mask.putpalette(palette)
        mask.save(os.path.join(directory, "masks", stem + ".png"))


def _write_instance_split(directory: str, domain: str, split: str, count: int, size: int, seed: int, fmt: str):
    """The images and ``annotations.json`` of one split, scenes without a rock left out."""
    from pycocotools import mask as mask_utils

    width = max(4, len(str(count - 1)))
    os.makedirs(os.path.join(directory, "images"))
    images, annotations = [], []
    per_class = dict.fromkeys(ROCK_INSTANCE_LABELS.values(), 0)
    for index in range(count):
        # The seed stream of load_rock_instance_dataset: scene `index` is its sample `index`.
        rng = np.random.default_rng(_sample_seed(seed, f"instances|{domain}", split, index))
        image, instance_map, classes = render_rock_instances(domain, rng, size)
        if classes.size == 0:
            continue
        file_name = f"scene_{index:0{width}d}{IMAGE_FORMATS[fmt]}"
        _save_image(image, os.path.join(directory, "images", file_name), fmt)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for instance, class_id in enumerate(classes.tolist(), 1):
            mask = np.asfortranarray(instance_map == instance, dtype=np.uint8)
            rle = mask_utils.encode(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": _COCO_CATEGORY[class_id],
                    "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            per_class[ROCK_INSTANCE_LABELS[class_id]] += 1
    if not images:
        raise ValueError(
            f"--instances: none of the {count} {split} scene(s) of {domain!r} at {size} px holds a rock of at least 32 "
            "pixels, so the COCO file would list no image; ask for more scenes or a larger image size."
        )
    coco = {
        "info": {"description": f"peft-vision-ext rock instances ({domain}, {split}, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": _COCO_CATEGORY[i], "name": name} for i, name in ROCK_INSTANCE_LABELS.items()],
    }
    with open(os.path.join(directory, "annotations.json"), "w", encoding="utf-8") as handle:
        json.dump(coco, handle)
    return InstanceSplit(len(images), count - len(images), per_class)


def write_rock_folders(
    out_dir: str | os.PathLike,
    domain: str,
    *,
    train: int = 64,
    validation: int = 16,
    test: int = 32,
    image_size: int = 128,
    seed: int = 0,
    image_format: str = "png",
    instances: bool = False,
    overwrite: bool = False,
    argument: str = "`out_dir`",
    overwrite_hint: str = "`overwrite=True`",
) -> RockFolders:
    """Render ``train`` / ``validation`` / ``test`` rock scenes of ``domain`` (``image_size`` pixels square) into
    ``out_dir`` in the folder layout of ``peft-vision train`` (see the module docstring); a split of 0 images is not
    written. ``argument`` and ``overwrite_hint`` name ``out_dir`` and the way to allow replacing it in messages.

    Raises:
        ValueError: see :func:`check_rock_folder_arguments`.
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.
    """
    counts = {"train": train, "validation": validation, "test": test}
    check_rock_folder_arguments(domain, counts, image_size, seed, image_format)
    out = RockFolders(os.fspath(out_dir), domain, image_size, image_format)
    with atomic_directory(out_dir, overwrite=overwrite, argument=argument, overwrite_hint=overwrite_hint) as tmp:
        with open(os.path.join(tmp, "id2label.json"), "w", encoding="utf-8") as handle:
            json.dump({str(k): v for k, v in ROCK_LABELS.items()}, handle, indent=2)
            handle.write("\n")
        for split, count in counts.items():
            if count == 0:
                continue
            _write_semantic_split(os.path.join(tmp, split), domain, split, count, image_size, seed, image_format)
            out.counts[split] = count
            if instances:
                directory = os.path.join(tmp, "instances", split)
                out.instances[split] = _write_instance_split(
                    directory, domain, split, count, image_size, seed, image_format
                )
    return out
