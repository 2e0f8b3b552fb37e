# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Batches of one size from images of any size: the transforms of the ``peft-vision train`` runner.

User images come in many sizes and formats; a batch needs one. These transforms read an image with
:func:`~peft_vision_ext.data.folders.image_to_rgb8` and its annotation (a class-id mask, or instance masks), bring
both to ``size x size`` with the same geometry, and hand the image to
:class:`~peft_vision_ext.data.SegmentationTransform` for the brightness/contrast jitter and the normalisation.

- Evaluation (``train=False``): the image is resized to ``size x size`` (bilinear, antialiased) and the masks with it
  (nearest); nothing random. This is what the saved image processor does at inference (``do_resize=True``).
- Training (``train=True``): the same resize, times a random scale ``s`` drawn uniformly from
  ``[min_scale, max_scale]``, then a random ``size x size`` crop; where the scaled image is smaller than the crop it
  is placed at a random offset and padded (image 0; class masks ``ignore_index``, so padding costs no loss; instance
  masks 0). Then a horizontal flip with ``hflip_prob``, a vertical one with ``vflip_prob``, and the jitter. With
  ``s = 1`` the geometry is exactly the evaluation's, so train and test see objects at the same scale on average.

:class:`FixedSizeSegmentationTransform` gives ``pixel_values`` / ``labels`` (semantic segmentation);
:class:`FixedSizeInstanceTransform` gives Mask2Former's ``pixel_values`` / ``mask_labels`` / ``class_labels``,
dropping instances the crop removed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .folders import image_to_rgb8, mask_to_class_ids
from .transforms import SegmentationTransform


__all__ = ["FixedSizeInstanceTransform", "FixedSizeSegmentationTransform"]


def _resize(array: np.ndarray, side: int, nearest: bool) -> np.ndarray:
    """``array`` ((H, W, 3) uint8 image, or (H, W) integer mask) resized to ``side x side``."""
    from PIL import Image

    if array.shape[:2] == (side, side):
        return array
    if nearest:
        # Mode "I" (int32) keeps class ids beyond 255 through the resize.
        resized = Image.fromarray(array.astype(np.int32), mode="I").resize((side, side), Image.Resampling.NEAREST)
        return np.asarray(resized).astype(array.dtype)
    return np.asarray(Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR))


class _FixedSize:
    """The geometry shared by both transforms (see the module docstring)."""

    def __init__(
        self,
        size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        *,
        train: bool,
        min_scale: float,
        max_scale: float,
        hflip_prob: float,
        vflip_prob: float,
        brightness: float,
        contrast: float,
        seed: int | None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`size` must be a positive number of pixels, got {size!r}.")
        if not 0 < min_scale <= max_scale:
            raise ValueError(
                f"`min_scale`={min_scale!r} and `max_scale`={max_scale!r} must satisfy 0 < min_scale <= max_scale."
            )
        for name, value in (("hflip_prob", hflip_prob), ("vflip_prob", vflip_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}.")
        for name, value in (("brightness", brightness), ("contrast", contrast)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a jitter amplitude in [0, 1), got {value!r}.")
        self.size = size
        self.train = train
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.hflip_prob = hflip_prob
        self.vflip_prob = vflip_prob
        self.rng = np.random.default_rng(seed)
        # Jitter and normalisation only: the flips are done here, on the image and every mask together.
        self.normalise = SegmentationTransform(
            image_mean,
            image_std,
            augment=train,
            seed=None if seed is None else seed + 1,
            brightness=brightness,
            contrast=contrast,
            flip_prob=0.0,
        )

    def geometry(
        self, image: np.ndarray, masks: list[np.ndarray], pads: list[int]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``image`` (H, W, 3) and each (H, W) mask to ``size x size``; ``pads``: the fill of each mask's padding."""
        size = self.size
        if not self.train:
            return _resize(image, size, nearest=False), [_resize(mask, size, nearest=True) for mask in masks]
        side = max(1, int(round(size * self.rng.uniform(self.min_scale, self.max_scale))))
        image = _resize(image, side, nearest=False)
        masks = [_resize(mask, side, nearest=True) for mask in masks]
        if side >= size:  # crop
            top, left = (int(self.rng.integers(0, side - size + 1)) for _ in range(2))
            image = image[top : top + size, left : left + size]
            masks = [mask[top : top + size, left : left + size] for mask in masks]
        else:  # pad: the scaled image at a random place on an empty canvas
            top, left = (int(self.rng.integers(0, size - side + 1)) for _ in range(2))
            canvas = np.zeros((size, size, 3), dtype=np.uint8)
            canvas[top : top + side, left : left + side] = image
            image = canvas
            padded = []
            for mask, pad in zip(masks, pads, strict=True):
                out = np.full((size, size), pad, dtype=mask.dtype)
                out[top : top + side, left : left + side] = mask
                padded.append(out)
            masks = padded
        if self.rng.random() < self.hflip_prob:
            image, masks = image[:, ::-1], [mask[:, ::-1] for mask in masks]
        if self.rng.random() < self.vflip_prob:
            image, masks = image[::-1], [mask[::-1] for mask in masks]
        return np.ascontiguousarray(image), [np.ascontiguousarray(mask) for mask in masks]

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        dummy = np.zeros(image.shape[:2], dtype=np.int64)
        return self.normalise({"image": image, "label": dummy})["pixel_values"]


class FixedSizeSegmentationTransform(_FixedSize):
    """``{image_column: [...], label_column: [...]}`` batches (or one example) to ``size x size`` tensors.

    Meant for ``Dataset.with_transform``. Images and masks may be paths, PIL images, arrays or ``datasets`` image
    records, in any format :mod:`~peft_vision_ext.data.folders` reads.

    Args:
        size: side of the square output, in pixels.
        image_mean, image_std: normalisation of images scaled to [0, 1] (the model's image processor's).
        train: random scale-crop and flips (see the module docstring); ``False``: resize only.
        ignore_index: mask value of padded pixels (and of pixels the loss skips).
        min_scale, max_scale: range of the random scale (train only).
        hflip_prob, vflip_prob: probabilities of a horizontal / vertical flip (train only).
        brightness, contrast: jitter amplitudes (train only; see :class:`SegmentationTransform`).
        seed: seed of the augmentation generators (``None``: nondeterministic).
        image_column, label_column: the columns read.

    Returns (when called):
        ``{"pixel_values": [float32 (3, size, size)], "labels": [int64 (size, size)]}``.
    """

    def __init__(
        self,
        size: int,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        *,
        train: bool = False,
        ignore_index: int = 255,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        hflip_prob: float = 0.5,
        vflip_prob: float = 0.0,
        brightness: float = 0.1,
        contrast: float = 0.1,
        seed: int | None = None,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        super().__init__(
            size,
            image_mean,
            image_std,
            train=train,
            min_scale=min_scale,
            max_scale=max_scale,
            hflip_prob=hflip_prob,
            vflip_prob=vflip_prob,
            brightness=brightness,
            contrast=contrast,
            seed=seed,
        )
        self.ignore_index = ignore_index
        self.image_column = image_column
        self.label_column = label_column

    def example(self, image: Any, label: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair as ``(pixel_values (3, size, size), labels (size, size))``."""
        image, label = image_to_rgb8(image), mask_to_class_ids(label)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"An image of {image.shape[1]}x{image.shape[0]} pixels has a mask of {label.shape[1]}x{label.shape[0]}; "
                "a mask must have its image's size."
            )
        image, (label,) = self.geometry(image, [label], [self.ignore_index])
        return self.pixel_values(image), torch.from_numpy(label.astype(np.int64))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, labels = batch[self.image_column], batch[self.label_column]
        if not isinstance(images, (list, tuple)):
            pixel_values, label = self.example(images, labels)
            return {"pixel_values": pixel_values, "labels": label}
        out = [self.example(image, label) for image, label in zip(images, labels, strict=True)]
        return {"pixel_values": [o[0] for o in out], "labels": [o[1] for o in out]}


class FixedSizeInstanceTransform(_FixedSize):
    """Instance-annotated batches (or one example) to Mask2Former inputs of ``size x size``.

    Two layouts of annotation are read:

    - COCO (:mod:`~peft_vision_ext.data.coco`): columns ``segmentation`` (the JSON text of the image's list of
      polygon/RLE segmentations) and ``classes`` (their class ids);
    - an instance map, as :func:`~peft_vision_ext.data.load_rock_instance_dataset` gives: ``instance_map`` (instance
      ``k`` on its pixels, 0 elsewhere) and ``instance_classes`` (entry ``k - 1`` for instance ``k``).

    Args: as :class:`FixedSizeSegmentationTransform` (without ``ignore_index``; padding is background).

    Returns (when called):
        ``{"pixel_values": [(3, size, size) float32], "mask_labels": [(N, size, size) float32],
        "class_labels": [(N,) int64]}``; instances left without pixels (cropped away) are dropped, so ``N`` may be 0.
    """

    def __init__(
        self,
        size: int,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        *,
        train: bool = False,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        hflip_prob: float = 0.5,
        vflip_prob: float = 0.0,
        brightness: float = 0.1,
        contrast: float = 0.1,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            size,
            image_mean,
            image_std,
            train=train,
            min_scale=min_scale,
            max_scale=max_scale,
            hflip_prob=hflip_prob,
            vflip_prob=vflip_prob,
            brightness=brightness,
            contrast=contrast,
            seed=seed,
        )

    @staticmethod
    def instances(example: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(masks (N, height, width) bool, classes (N,) int64)`` of one example, in either layout."""
        if "instance_map" in example:
            ids = mask_to_class_ids(example["instance_map"])
            classes = np.asarray(list(example["instance_classes"]), dtype=np.int64).reshape(-1)
            masks = ids[None] == np.arange(1, len(classes) + 1)[:, None, None]
            return masks, classes
        from .coco import decode_instance_masks

        segmentations = example["segmentation"]
        if isinstance(segmentations, str):
            segmentations = json.loads(segmentations)
        masks = decode_instance_masks(segmentations, height, width)
        return masks, np.asarray(list(example["classes"]), dtype=np.int64).reshape(-1)

    def example(self, example: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = image_to_rgb8(example["image"])
        masks, classes = self.instances(example, *image.shape[:2])
        if masks.shape[1:] != image.shape[:2]:
            raise ValueError(
                f"An image of {image.shape[1]}x{image.shape[0]} pixels has instance masks of "
                f"{masks.shape[2]}x{masks.shape[1]}; masks must have their image's size."
            )
        image, resized = self.geometry(image, [mask.astype(np.uint8) for mask in masks], [0] * len(masks))
        stack = np.stack(resized).astype(bool) if resized else np.zeros((0, self.size, self.size), dtype=bool)
        keep = stack.any(axis=(1, 2))  # a scene without instances has a (0, size, size) stack
        return (
            self.pixel_values(image),
            torch.from_numpy(stack[keep].astype(np.float32)),
            torch.from_numpy(classes[keep]),
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(batch["image"], (list, tuple)):
            pixel_values, masks, classes = self.example(batch)
            return {"pixel_values": pixel_values, "mask_labels": masks, "class_labels": classes}
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        out = [self.example(row) for row in rows]
        return {
            "pixel_values": [o[0] for o in out],
            "mask_labels": [o[1] for o in out],
            "class_labels": [o[2] for o in out],
        }
