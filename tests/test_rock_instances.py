# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Tests of the embedded rock-instance data and its Mask2Former transform (``peft_vision_ext.data``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from peft_vision_ext.data import (
    BOULDER_RADIUS,
    ROCK_DOMAINS,
    ROCK_INSTANCE_LABELS,
    InstanceSegmentationTransform,
    collate_instance_segmentation,
    load_rock_instance_dataset,
    render_rock_instances,
    render_rock_scene,
)
from peft_vision_ext.data.rocks import _STYLES, _render_scene


SIZE = 128  # the default size: `min_area` is in pixels, so the statistics hold at this size


@pytest.fixture(scope="module")
def instance_scenes() -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    return {d: [render_rock_instances(d, np.random.default_rng(i), SIZE) for i in range(20)] for d in ROCK_DOMAINS}


def test_constants():
    assert ROCK_INSTANCE_LABELS == {0: "rock", 1: "boulder"}
    assert 0 < BOULDER_RADIUS < 0.5


@pytest.mark.parametrize("domain", ROCK_DOMAINS)
def test_instances_are_contiguous_large_enough_rocks(domain, instance_scenes):
    for image, instance_map, classes in instance_scenes[domain]:
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert instance_map.shape == (SIZE, SIZE) and instance_map.dtype == np.uint8
        assert classes.dtype == np.int64 and set(classes.tolist()) <= set(ROCK_INSTANCE_LABELS)
        ids = np.unique(instance_map)
        # ids 1..N, each with at least min_area pixels, one class each
        np.testing.assert_array_equal(ids[ids > 0], np.arange(1, classes.size + 1))
        areas = np.bincount(instance_map.ravel())[1:]
        assert (areas >= 32).all()


def test_instances_lie_on_rock_pixels_of_the_semantic_render():
    """Instance masks are the rock pixels of the same scene: ids > 0 only where the semantic label is "rock", and
    every rock pixel not annotated belongs to a rock below ``min_area``."""
    style = _STYLES["source"]
    for seed in range(5):
        _, label, rocks, _ = _render_scene(style, np.random.default_rng(seed), SIZE, SIZE)
        assert ((rocks > 0) == (label == 1)).all()


def test_semantic_scenes_unchanged_by_the_instance_outputs():
    # render_rock_scene draws exactly what _render_scene draws (the instance map costs no random numbers).
    for domain in ROCK_DOMAINS:
        image, label = render_rock_scene(domain, np.random.default_rng(3), 64)
        image2, label2, _, _ = _render_scene(_STYLES[domain], np.random.default_rng(3), 64, 64)
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(label, label2)


def test_domains_differ_in_class_mix_and_count(instance_scenes):
    def boulder_share(domain):
        classes = np.concatenate([c for _, _, c in instance_scenes[domain]])
        return classes.mean()

    def mean_count(domain):
        return np.mean([c.size for _, _, c in instance_scenes[domain]])

    assert boulder_share("moon-boulders") > 0.9  # a class-set shift: nearly only boulders
    assert boulder_share("mars") < boulder_share("source") < boulder_share("moon-boulders")
    assert 0.2 < boulder_share("source") < 0.75  # the source domain has both classes
    assert mean_count("mars") > mean_count("source") > mean_count("moon-boulders")


def test_render_instances_is_deterministic_and_checks_min_area():
    a = render_rock_instances("mars", np.random.default_rng(7), 64)
    b = render_rock_instances("mars", np.random.default_rng(7), 64)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    fewer = render_rock_instances("mars", np.random.default_rng(7), 64, min_area=60)[2]
    assert fewer.size <= a[2].size
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="min_area"):
            render_rock_instances("mars", np.random.default_rng(0), 64, min_area=bad)
    with pytest.raises(ValueError, match="domain"):
        render_rock_instances("venus", np.random.default_rng(0), 64)


def test_instance_dataset_columns_and_determinism():
    ds = load_rock_instance_dataset("moon-real", "train", num_samples=4, image_size=64, seed=2)
    assert set(ds.column_names) == {"image", "instance_map", "instance_classes"}
    example = ds[0]
    assert isinstance(example["image"], Image.Image) and example["image"].mode == "RGB"
    assert example["instance_map"].mode == "L"
    assert len(example["instance_classes"]) == int(np.asarray(example["instance_map"]).max())
    again = load_rock_instance_dataset("moon-real", "train", num_samples=6, image_size=64, seed=2)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(ds[i]["instance_map"]), np.asarray(again[i]["instance_map"]))
        assert ds[i]["instance_classes"] == again[i]["instance_classes"]
    test = load_rock_instance_dataset("moon-real", "test", num_samples=4, image_size=64, seed=2)
    assert not np.array_equal(np.asarray(ds[0]["image"]), np.asarray(test[0]["image"]))
    for kwargs, match in (
        ({"num_samples": 0}, "num_samples"),
        ({"split": "dev"}, "split"),
        ({"seed": -1}, "seed"),
        ({"min_area": 0}, "min_area"),
    ):
        with pytest.raises(ValueError, match=match):
            load_rock_instance_dataset(**{"num_samples": 1, "image_size": 64, **kwargs})


def test_transform_and_collate_give_mask2former_inputs():
    ds = load_rock_instance_dataset("source", "train", num_samples=3, image_size=64)
    batch = InstanceSegmentationTransform()(ds[:3])
    assert set(batch) == {"pixel_values", "mask_labels", "class_labels"}
    raw = ds[:3]
    for pixels, masks, labels, instance_map, classes in zip(
        batch["pixel_values"],
        batch["mask_labels"],
        batch["class_labels"],
        raw["instance_map"],
        raw["instance_classes"],
    ):
        ids = np.asarray(instance_map)
        assert pixels.shape == (3, 64, 64) and masks.dtype == torch.float32 and labels.dtype == torch.long
        assert masks.shape == (len(classes), 64, 64)
        assert labels.tolist() == list(classes)
        for k in range(len(classes)):
            np.testing.assert_array_equal(masks[k].numpy(), (ids == k + 1).astype(np.float32))
    collated = collate_instance_segmentation([ds.with_transform(InstanceSegmentationTransform())[i] for i in range(3)])
    assert collated["pixel_values"].shape == (3, 3, 64, 64)
    assert [m.shape[0] for m in collated["mask_labels"]] == [len(c) for c in ds[:3]["instance_classes"]]
    with pytest.raises(ValueError, match="at least one example"):
        collate_instance_segmentation([])


def test_transform_flip_keeps_masks_aligned_and_handles_edge_cases():
    ds = load_rock_instance_dataset("source", "train", num_samples=1, image_size=64)
    example = ds[0]
    plain = InstanceSegmentationTransform()(example)
    flipped = InstanceSegmentationTransform(augment=True, flip_prob=1.0, seed=0)(example)
    torch.testing.assert_close(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    torch.testing.assert_close(flipped["mask_labels"], plain["mask_labels"].flip(-1))
    assert torch.equal(flipped["class_labels"], plain["class_labels"])

    empty = {"image": example["image"], "instance_map": np.zeros((64, 64), np.uint8), "instance_classes": []}
    out = InstanceSegmentationTransform()(empty)
    assert out["mask_labels"].shape == (0, 64, 64) and out["class_labels"].shape == (0,)

    # an instance id without a class is refused in words, not silently dropped
    with pytest.raises(ValueError, match="instance id 3 .* only 1 entries"):
        InstanceSegmentationTransform()(
            {"image": example["image"], "instance_map": np.full((64, 64), 3, np.uint8), "instance_classes": [0]}
        )
