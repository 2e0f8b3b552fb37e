# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Batches of one size from images of any size: the transform of the ``peft-vision train`` runner.

User images come in many sizes and formats; a batch needs one. :class:`FixedSizeSegmentationTransform` reads an
``(image, mask)`` pair with :func:`~peft_vision_ext.data.folders.image_to_rgb8` /
:func:`~peft_vision_ext.data.folders.mask_to_class_ids`, brings it to ``size x size`` and hands it to
:class:`~peft_vision_ext.data.SegmentationTransform` for the horizontal flip, the brightness/contrast jitter and the
normalisation.

- Evaluation (``train=False``): the image is resized to ``size x size`` (bilinear, antialiased) and the mask with it
  (nearest); nothing random. This is what the saved image processor does at inference (``do_resize=True``).
- Training (``train=True``): the same resize, times a random scale ``s`` drawn uniformly from
  ``[min_scale, max_scale]``, then a random ``size x size`` crop; where the scaled image is smaller than the crop it
  is placed at a random offset and padded (image 0, mask ``ignore_index``, so padding costs no loss). Then a vertical
  flip with ``vflip_prob``, and :class:`SegmentationTransform`'s horizontal flip (``hflip_prob``) and jitter. With
  ``s = 1`` the geometry is exactly the evaluation's, so train and test see objects at the same scale on average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .folders import image_to_rgb8, mask_to_class_ids
from .transforms import SegmentationTransform


__all__ = ["FixedSizeSegmentationTransform"]


def _resize(array: np.ndarray, side: int, nearest: bool) -> np.ndarray:
    """``array`` ((H, W, 3) uint8 or (H, W) int64) resized to ``side x side``."""
    from PIL import Image

    if array.shape[:2] == (side, side):
        return array
    if nearest:
        # Mode "I" (int32) keeps class ids beyond 255 through the resize.
        resized = Image.fromarray(array.astype(np.int32), mode="I").resize((side, side), Image.Resampling.NEAREST)
        return np.asarray(resized).astype(np.int64)
    return np.asarray(Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR))


class FixedSizeSegmentationTransform:
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
        self.ignore_index = ignore_index
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.vflip_prob = vflip_prob
        self.image_column = image_column
        self.label_column = label_column
        self.rng = np.random.default_rng(seed)
        self.normalise = SegmentationTransform(
            image_mean,
            image_std,
            augment=train,
            seed=None if seed is None else seed + 1,
            brightness=brightness,
            contrast=contrast,
            flip_prob=hflip_prob,
        )

    def _scale_crop(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.size
        side = max(1, int(round(size * self.rng.uniform(self.min_scale, self.max_scale))))
        image, label = _resize(image, side, nearest=False), _resize(label, side, nearest=True)
        if side >= size:  # crop
            top, left = (int(self.rng.integers(0, side - size + 1)) for _ in range(2))
            return image[top : top + size, left : left + size], label[top : top + size, left : left + size]
        # pad: the scaled image at a random place on an empty canvas whose pixels the loss ignores
        top, left = (int(self.rng.integers(0, size - side + 1)) for _ in range(2))
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        labels = np.full((size, size), self.ignore_index, dtype=np.int64)
        canvas[top : top + side, left : left + side] = image
        labels[top : top + side, left : left + side] = label
        return canvas, labels

    def example(self, image: Any, label: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair as ``(pixel_values (3, size, size), labels (size, size))``."""
        image, label = image_to_rgb8(image), mask_to_class_ids(label)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"An image of {image.shape[1]}x{image.shape[0]} pixels has a mask of {label.shape[1]}x{label.shape[0]}; "
                "a mask must have its image's size."
            )
        if self.train:
            image, label = self._scale_crop(image, label)
            if self.rng.random() < self.vflip_prob:
                image, label = image[::-1], label[::-1]
        else:
            image, label = _resize(image, self.size, nearest=False), _resize(label, self.size, nearest=True)
        out = self.normalise({"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label)})
        return out["pixel_values"], out["labels"]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, labels = batch[self.image_column], batch[self.label_column]
        if not isinstance(images, (list, tuple)):
            pixel_values, label = self.example(images, labels)
            return {"pixel_values": pixel_values, "labels": label}
        out = [self.example(image, label) for image, label in zip(images, labels, strict=True)]
        return {"pixel_values": [o[0] for o in out], "labels": [o[1] for o in out]}
