# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Your own images and masks on disk: folders paired by file stem, readers for what cameras and annotation tools
write, and an up-front check of every pair.

A split folder holds ``images/`` and ``masks/``; ``images/scene_01.jpg`` pairs with ``masks/scene_01.png`` (same
stem, any supported extension)::

    my_data/train/images/scene_01.jpg   my_data/train/masks/scene_01.png
    my_data/train/images/scene_02.tif   my_data/train/masks/scene_02.png

Images (:func:`image_to_rgb8`): PNG, JPEG, TIFF, BMP or WebP; RGB, RGBA (alpha dropped), grayscale (repeated to three
channels), palette, CMYK; 16-bit (``I;16``) images are scaled by the largest value of their dtype (65535), so a
16-bit pixel ``v`` becomes ``round(v * 255 / 65535)``; 32-bit integer images (mode ``I``) whose values fit 16 bits are
read as 16-bit; float images (mode ``F``) must lie in [0, 1].

Masks (:func:`mask_to_class_ids`) hold one class id per pixel, losslessly (PNG, TIFF, BMP; JPEG is refused): 8-bit
(``L``), 16-bit, 1-bit, or palette PNGs (mode ``P``), whose palette *index* is the class id, whatever colour the
palette gives it. An RGB mask is accepted only when its three channels are equal (a grayscale mask saved as RGB); a
colour-coded mask must be converted to class ids first.

:func:`scan_pairs` reads every pair once before training (masks in full, images in full too, so that a truncated
file is found before the first epoch rather than in it) and reports the class ids present, in one
:class:`PairScan`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "ImageMaskPairs",
    "PairScan",
    "find_image_mask_pairs",
    "image_to_rgb8",
    "mask_to_class_ids",
    "open_image",
    "scan_pairs",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
"""File extensions read as images (case-insensitive)."""

MASK_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp")
"""File extensions read as masks: lossless formats only (JPEG would blur the class ids at every edge)."""

# How many file names an error message lists.
_SHOWN = 3
_UINT16_MAX = np.iinfo(np.uint16).max
_INT32_MAX = np.iinfo(np.int32).max


def _names(items: Sequence[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(repr(item) for item in items[:_SHOWN])
    return shown + (f" and {total - _SHOWN} more" if total > _SHOWN else "")


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------
def open_image(value: Any):
    """A PIL image from a path, a ``datasets`` ``{"bytes", "path"}`` record, raw bytes or a PIL image (returned as
    is); a numpy array is returned unchanged. Nothing is decoded yet (PIL opens lazily)."""
    from PIL import Image

    if isinstance(value, np.ndarray) or isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path") is not None):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    if isinstance(value, (list, tuple)) or hasattr(value, "__array__"):  # e.g. a `datasets` Array2D column
        return np.asarray(value)
    raise TypeError(
        f"Cannot read an image from a {type(value).__name__}; expected a file path, a PIL image, a numpy array or a "
        "`datasets.Image` record."
    )


def _size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or an array (read from the header: nothing is decoded)."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    width, height = image.size
    return int(height), int(width)


def image_to_rgb8(image: Any) -> np.ndarray:
    """Any supported image (see the module docstring) as an ``(H, W, 3)`` ``uint8`` RGB array.

    Raises:
        ValueError: a float image outside [0, 1], a 32-bit image beyond 16-bit values, or an array of another shape.
    """
    image = open_image(image)
    if not isinstance(image, np.ndarray):
        mode = image.mode
        if mode.startswith("I;16") or mode in ("I", "F"):
            array = np.asarray(image)
        elif mode in ("RGB", "L"):
            array = np.asarray(image)
        elif mode in ("LA", "La"):
            array = np.asarray(image.getchannel(0))
        else:  # RGBA, P, CMYK, YCbCr, 1, ...: PIL knows the conversion
            array = np.asarray(image.convert("RGB"))
    else:
        array = image
    array = _scaled_to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"Images must be (height, width) grayscale or (height, width, 3) RGB, got an array of shape "
            f"{tuple(array.shape)}. Convert multi-band images to RGB first."
        )
    return np.ascontiguousarray(array)


def _scaled_to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit values from 8-bit, 16-bit, 32-bit integer (16-bit range) or [0, 1] float pixels."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "f":
        finite = np.isfinite(array).all()
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not finite or low < 0.0 or high > 1.0:
            raise ValueError(
                f"A float image must hold values in [0, 1], got values in [{low:g}, {high:g}]. Save it as an 8-bit or "
                "16-bit image, or scale it to [0, 1]."
            )
        return np.round(array * 255.0).astype(np.uint8)
    if array.dtype.kind in "iu":
        high = int(array.max()) if array.size else 0
        low = int(array.min()) if array.size else 0
        if array.dtype.itemsize <= 2:
            scale = float(np.iinfo(array.dtype).max)
        elif low >= 0 and high <= _UINT16_MAX:
            scale = float(_UINT16_MAX)  # PIL's mode "I" holds 16-bit files on some versions
        else:
            scale = float(_INT32_MAX)
        if low < 0:
            raise ValueError(f"Image pixels must be non-negative, got a minimum of {low}.")
        return np.round(array.astype(np.float64) * (255.0 / scale)).astype(np.uint8)
    raise ValueError(f"Unsupported image pixel type {array.dtype}; save the image as an 8-bit or 16-bit PNG or TIFF.")


def mask_to_class_ids(mask: Any) -> np.ndarray:
    """A class-index mask (see the module docstring) as an ``(H, W)`` ``int64`` array.

    Raises:
        ValueError: a colour (RGB with unequal channels) mask, negative or fractional ids, or another shape.
    """
    mask = open_image(mask)
    if not isinstance(mask, np.ndarray):
        mode = mask.mode
        if mode == "1":
            mask = mask.convert("L")
            array = (np.asarray(mask) > 0).astype(np.int64)
            return array
        if mode in ("RGBA", "LA", "La", "PA"):
            mask = mask.getchannel(0) if mode != "RGBA" else mask.convert("RGB")
        if mode in ("CMYK", "YCbCr", "HSV", "LAB"):
            raise ValueError(
                f"A mask must hold class ids in one channel (grayscale, 16-bit or palette PNG), got a {mode} image."
            )
        array = np.asarray(mask)  # mode P: the palette indices, never the colours
    else:
        array = mask
    if array.ndim == 3:
        if array.shape[2] == 1:
            array = array[:, :, 0]
        elif array.shape[2] in (3, 4) and (array[:, :, :3] == array[:, :, :1]).all():
            array = array[:, :, 0]
        else:
            raise ValueError(
                "The mask is a colour image (its RGB channels differ). Save class ids as a single-channel PNG (pixel "
                "value = class id) or a palette PNG (palette index = class id)."
            )
    if array.ndim != 2:
        raise ValueError(f"A mask must be (height, width), got an array of shape {tuple(array.shape)}.")
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise ValueError("The mask holds fractional values; class ids must be whole numbers.")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"Unsupported mask pixel type {array.dtype}; save class ids as an 8-bit or 16-bit PNG.")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"The mask holds negative values (minimum {int(array.min())}); class ids must be >= 0.")
    return array


# ----------------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ImageMaskPairs:
    """Image and mask files of one split folder, paired by stem (sorted by stem)."""

    directory: str
    stems: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stems)


def _files_by_stem(folder: str, extensions: tuple[str, ...], argument: str, what: str) -> tuple[dict[str, str], list]:
    """``{stem: path}`` of the files with ``extensions`` in ``folder`` (hidden files skipped), and the other files."""
    found: dict[str, str] = {}
    others: list[str] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        stem, extension = os.path.splitext(name)
        if extension.lower() not in extensions:
            others.append(name)
            continue
        if stem in found:
            raise ValueError(
                f"{argument}: {folder!r} holds two {what} named {stem!r} ({os.path.basename(found[stem])!r} and "
                f"{name!r}); images and masks pair by file stem, so keep one."
            )
        found[stem] = path
    return found, others


def find_image_mask_pairs(directory: str | os.PathLike, argument: str = "`directory`") -> ImageMaskPairs:
    """Pair ``directory/images/*`` with ``directory/masks/*`` by file stem.

    Args:
        directory: a split folder holding ``images/`` and ``masks/``.
        argument: how error messages name the folder (e.g. ``"`--train_dir`"``).

    Raises:
        FileNotFoundError: ``directory``, ``images/`` or ``masks/`` is missing.
        ValueError: an image without a mask or a mask without an image (a few are named), a JPEG mask, two files with
            one stem, or no pairs at all.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        what = "is a file, not a folder" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(
            f"{argument} {directory!r} {what}. Pass a folder holding images/ and masks/ (paired by file name)."
        )
    for sub in ("images", "masks"):
        if not os.path.isdir(os.path.join(directory, sub)):
            raise FileNotFoundError(
                f"{argument} {directory!r} has no {sub}/ folder (it holds {sorted(os.listdir(directory))[:6]}). Put "
                "the images in images/ and their masks, with the same file names, in masks/."
            )
    images, _ = _files_by_stem(os.path.join(directory, "images"), IMAGE_EXTENSIONS, argument, "images")
    masks, other_masks = _files_by_stem(os.path.join(directory, "masks"), MASK_EXTENSIONS, argument, "masks")
    lossy = [name for name in other_masks if os.path.splitext(name)[1].lower() in (".jpg", ".jpeg")]
    if lossy:
        raise ValueError(
            f"{argument}: masks must be lossless, got {len(lossy)} JPEG mask(s) in {directory!r}/masks: "
            f"{_names(lossy)}. JPEG changes the class ids along every edge; save masks as PNG."
        )
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"{len(no_mask)} image(s) have no mask in masks/ ({_names(no_mask)})")
        if no_image:
            parts.append(f"{len(no_image)} mask(s) have no image in images/ ({_names(no_image)})")
        raise ValueError(
            f"{argument} {directory!r}: " + "; ".join(parts) + ". Images and masks pair by file stem "
            "(images/a.jpg with masks/a.png): add the missing files or remove the extra ones."
        )
    if not images:
        raise ValueError(
            f"{argument} {directory!r}: images/ holds no image ({', '.join(IMAGE_EXTENSIONS)}). Put the images there."
        )
    stems = sorted(images)
    return ImageMaskPairs(directory, stems, [images[s] for s in stems], [masks[s] for s in stems])


# ----------------------------------------------------------------------------------------------------------------------
# The up-front check
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class PairScan:
    """What :func:`scan_pairs` found.

    Attributes:
        class_ids: every id present in the masks -> a few names of masks holding it.
        max_side: the largest height or width among the images.
        count: number of pairs scanned.
    """

    class_ids: dict[int, list[str]] = field(default_factory=dict)
    max_side: int = 0
    count: int = 0

    def merge(self, other: PairScan) -> PairScan:
        ids = {key: list(value) for key, value in self.class_ids.items()}
        for key, names in other.class_ids.items():
            ids.setdefault(key, []).extend(name for name in names if len(ids[key]) < _SHOWN)
        return PairScan(ids, max(self.max_side, other.max_side), self.count + other.count)


def _file_name(value: Any, fallback: str) -> str:
    """The file name of an image given as a path or a ``datasets`` record; ``fallback`` otherwise."""
    if isinstance(value, (str, os.PathLike)):
        return os.path.basename(os.fspath(value))
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return os.path.basename(value["path"])
    return fallback


def _check_pair(image: Any, mask: Any, name: str, decode_image: bool) -> tuple[str | None, Any]:
    """``(problem, message)`` for a bad pair, else ``(None, (ids present, longest image side))``."""
    try:
        opened = open_image(image)
        size = _size(opened)
        if decode_image:
            image_to_rgb8(opened)
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return "image", f"{_file_name(image, name)}: {' '.join(str(exc).split())}"
    try:
        ids = mask_to_class_ids(mask)
    except Exception as exc:
        return "mask", f"{_file_name(mask, name)}: {' '.join(str(exc).split())}"
    if ids.shape != size:
        return "size", f"{name} (image {size[1]}x{size[0]}, mask {ids.shape[1]}x{ids.shape[0]})"
    return None, (np.unique(ids), max(size))


def scan_pairs(
    images: Sequence[Any],
    masks: Sequence[Any],
    names: Sequence[str],
    *,
    argument: str,
    decode_images: bool = True,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PairScan:
    """Read every ``(image, mask)`` pair once and return the class ids present (see :class:`PairScan`).

    Args:
        images, masks: paths, PIL images, arrays or ``datasets`` records (see :func:`open_image`).
        names: a name per pair for messages (file names, row numbers).
        argument: how messages name the data (e.g. ``"`--train_dir` 'data/train'"``).
        decode_images: decode images in full (finds truncated files); ``False`` reads their size only.
        workers: reader threads (PIL decodes without the GIL); default: up to 8.
        progress: called with the number of pairs done after each one.

    Raises:
        ValueError: unreadable images or masks, or an image and its mask of different sizes (a few are named).
    """
    if not (len(images) == len(masks) == len(names)):
        raise ValueError(f"{argument}: {len(images)} images, {len(masks)} masks and {len(names)} names differ.")
    workers = workers or min(8, os.cpu_count() or 1)
    problems: dict[str, list[str]] = {"image": [], "mask": [], "size": []}
    scan = PairScan(count=len(images))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda pair: _check_pair(*pair, decode_images), zip(images, masks, names))
        for done, (problem, detail) in enumerate(results, 1):
            if problem is not None:
                problems[problem].append(detail)
            else:
                ids, side = detail
                scan.max_side = max(scan.max_side, side)
                for class_id in ids.tolist():
                    holders = scan.class_ids.setdefault(int(class_id), [])
                    if len(holders) < _SHOWN:
                        holders.append(names[done - 1])
            if progress is not None:
                progress(done)
    if problems["image"]:
        raise ValueError(
            f"{argument}: {len(problems['image'])} image(s) cannot be read: {_names(problems['image'])}. Replace or "
            "remove them (supported: PNG, JPEG, TIFF, BMP, WebP; RGB, grayscale, 16-bit)."
        )
    if problems["mask"]:
        raise ValueError(
            f"{argument}: {len(problems['mask'])} mask(s) cannot be read as class ids: {_names(problems['mask'])}."
        )
    if problems["size"]:
        raise ValueError(
            f"{argument}: {len(problems['size'])} image(s) and their masks differ in size: "
            f"{_names(problems['size'])}. A mask must have its image's height and width."
        )
    return scan
