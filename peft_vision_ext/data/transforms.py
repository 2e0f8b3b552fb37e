"""Batch transforms and collation: semantic segmentation (``image`` / ``label`` PIL columns) and instance
segmentation (``image`` / ``instance_map`` / ``instance_classes``, into Mask2Former's ``mask_labels`` /
``class_labels``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


__all__ = [
    "InstanceSegmentationTransform",
    "SegmentationTransform",
    "collate_instance_segmentation",
    "collate_segmentation",
]


def _to_array(img: Any, rgb: bool) -> np.ndarray:
    """PIL image or array -> numpy array ((H, W, 3) for images, (H, W) for labels)."""
    if hasattr(img, "convert"):  # PIL image; labels must keep their raw ids, so no mode conversion for them
        img = img.convert("RGB") if rgb else img
    arr = np.asarray(img)
    if rgb and arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if not rgb and arr.ndim == 3:
        arr = arr[:, :, 0]
    return arr


class SegmentationTransform:
    """Convert ``{"image": [...], "label": [...]}`` batches to normalised tensors, with optional light augmentation.

    Meant for ``Dataset.set_transform`` / ``Dataset.with_transform``, which pass a batch dict of lists; a single
    example (a dict of PIL images instead of lists) is accepted too and returns a dict of single tensors.

    Args:
        image_mean: per-channel mean subtracted from images scaled to [0, 1] (ImageNet by default).
        image_std: per-channel std dividing the centred images.
        augment: if ``True``, apply a random horizontal flip to image *and* label, and a small brightness / contrast
            jitter to the image only (labels are never resampled or changed).
        seed: seed of the augmentation generator (``None`` = nondeterministic).

    Returns (when called):
        ``{"pixel_values": [float32 tensor (3, H, W), ...], "labels": [int64 tensor (H, W), ...]}``.
    """

    def __init__(
        self,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: bool = False,
        seed: int | None = None,
        brightness: float = 0.1,
        contrast: float = 0.1,
        flip_prob: float = 0.5,
    ) -> None:
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(
                f"`image_mean`={tuple(image_mean)!r} and `image_std`={tuple(image_std)!r} must have 3 values (RGB)."
            )
        if any(s <= 0 for s in image_std):
            raise ValueError(f"`image_std`={tuple(image_std)!r} must be strictly positive.")
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.augment = augment
        self.brightness = brightness
        self.contrast = contrast
        self.flip_prob = flip_prob
        self.rng = np.random.default_rng(seed)

    def _one(self, image: Any, label: Any) -> tuple[torch.Tensor, torch.Tensor]:
        img = _to_array(image, rgb=True).astype(np.float32) / 255.0
        lab = _to_array(label, rgb=False).astype(np.int64)
        if img.shape[:2] != lab.shape:
            raise ValueError(f"Image of shape {img.shape[:2]} and label of shape {lab.shape} differ in size.")
        if self.augment:
            if self.rng.random() < self.flip_prob:
                # The same flip for image and label keeps them aligned.
                img = img[:, ::-1]
                lab = lab[:, ::-1]
            b = 1.0 + self.brightness * self.rng.uniform(-1.0, 1.0)
            c = 1.0 + self.contrast * self.rng.uniform(-1.0, 1.0)
            mean = img.mean()
            img = np.clip((img - mean) * c + mean * b, 0.0, 1.0)
        img = (img - self.image_mean) / self.image_std
        pixel_values = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
        labels = torch.from_numpy(np.ascontiguousarray(lab))
        return pixel_values, labels

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, labels = batch["image"], batch["label"]
        if not isinstance(images, (list, tuple)):
            pixel_values, label = self._one(images, labels)
            return {"pixel_values": pixel_values, "labels": label}
        out = [self._one(img, lab) for img, lab in zip(images, labels, strict=True)]
        return {"pixel_values": [o[0] for o in out], "labels": [o[1] for o in out]}


def collate_segmentation(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into ``{"pixel_values": (B, 3, H, W) float32, "labels": (B, H, W) int64}``.

    Usable as ``Trainer(data_collator=collate_segmentation)`` on a dataset transformed by ``SegmentationTransform``.
    """
    if len(examples) == 0:
        raise ValueError("`examples` is empty; collate_segmentation needs at least one example.")
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"], dtype=torch.float32) for e in examples])
    labels = torch.stack([torch.as_tensor(e["labels"], dtype=torch.long) for e in examples])
    return {"pixel_values": pixel_values, "labels": labels}


class InstanceSegmentationTransform:
    """Convert ``{"image", "instance_map", "instance_classes"}`` batches into Mask2Former / MaskFormer inputs.

    ``instance_map`` holds instance ``k`` (1-based) on its pixels and 0 on background; ``instance_classes[k - 1]`` is
    its class id. Meant for ``Dataset.set_transform`` / ``with_transform`` (a batch dict of lists); a single example
    is accepted too.

    Args:
        image_mean, image_std: per-channel normalisation of images scaled to [0, 1] (ImageNet by default).
        augment: random horizontal flip of the image together with its masks (masks are never resampled).
        seed: seed of the augmentation generator (``None`` = nondeterministic).

    Returns (when called):
        ``{"pixel_values": [(3, H, W) float32], "mask_labels": [(N, H, W) float32 binary masks],
        "class_labels": [(N,) int64]}`` with one entry per image; ``N`` may be 0.
    """

    def __init__(
        self,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: bool = False,
        seed: int | None = None,
        flip_prob: float = 0.5,
    ) -> None:
        self._image = SegmentationTransform(image_mean, image_std, augment=False)
        self.augment = augment
        self.flip_prob = flip_prob
        self.rng = np.random.default_rng(seed)

    def _one(self, image: Any, instance_map: Any, classes: Sequence[int]) -> tuple[torch.Tensor, ...]:
        pixel_values, ids = self._image._one(image, instance_map)
        classes = torch.as_tensor(list(classes), dtype=torch.long).reshape(-1)
        present = torch.unique(ids)
        present = present[present > 0]
        if present.numel() and int(present.max()) > classes.numel():
            raise ValueError(
                f"`instance_map` has instance id {int(present.max())} but `instance_classes` has only "
                f"{classes.numel()} entries; instance k needs its class at index k - 1."
            )
        if self.augment and self.rng.random() < self.flip_prob:
            pixel_values = pixel_values.flip(-1)
            ids = ids.flip(-1)
        masks = ids.unsqueeze(0) == torch.arange(1, classes.numel() + 1).view(-1, 1, 1)
        # Instances fully hidden (no pixels) would be unmatched targets with empty masks: drop them.
        keep = masks.flatten(1).any(dim=1)
        return pixel_values, masks[keep].float(), classes[keep]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, maps, classes = batch["image"], batch["instance_map"], batch["instance_classes"]
        if not isinstance(images, (list, tuple)):
            pixel_values, masks, labels = self._one(images, maps, classes)
            return {"pixel_values": pixel_values, "mask_labels": masks, "class_labels": labels}
        out = [self._one(*example) for example in zip(images, maps, classes, strict=True)]
        return {
            "pixel_values": [o[0] for o in out],
            "mask_labels": [o[1] for o in out],
            "class_labels": [o[2] for o in out],
        }


def collate_instance_segmentation(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"pixel_values": (B, 3, H, W), "mask_labels": [B x (N_i, H, W)], "class_labels": [B x (N_i,)]}``: the
    keyword arguments of ``Mask2FormerForUniversalSegmentation.forward`` (instance counts differ, so targets stay
    lists). Usable as ``Trainer(data_collator=...)`` on a dataset transformed by ``InstanceSegmentationTransform``."""
    if len(examples) == 0:
        raise ValueError("`examples` is empty; collate_instance_segmentation needs at least one example.")
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"], dtype=torch.float32) for e in examples]),
        "mask_labels": [torch.as_tensor(e["mask_labels"], dtype=torch.float32) for e in examples],
        "class_labels": [torch.as_tensor(e["class_labels"], dtype=torch.long) for e in examples],
    }
