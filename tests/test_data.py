"""Tests of the embedded procedural rock-field data (``peft_vision_ext.data``)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from peft_vision_ext.data import (
    ROCK_DOMAINS,
    ROCK_IGNORE_INDEX,
    ROCK_LABELS,
    SegmentationTransform,
    collate_segmentation,
    load_rock_dataset,
    load_rock_datasets,
    render_rock_scene,
)


SIZE = 64  # small scenes keep the suite fast; the renderer is resolution independent


def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([np.asarray(im) for im in ds["image"]])
    labels = np.stack([np.asarray(lab) for lab in ds["label"]])
    return images, labels


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """20 scenes per domain at 96 px, shared by the statistical tests."""
    return {d: [render_rock_scene(d, np.random.default_rng(i), 96) for i in range(20)] for d in ROCK_DOMAINS}


# ----------------------------------------------------------------------------------------------------------------------
# Constants and renderer
# ----------------------------------------------------------------------------------------------------------------------


def test_constants():
    assert ROCK_LABELS == {0: "ground", 1: "rock", 2: "sky"}
    assert ROCK_IGNORE_INDEX == 255
    assert ROCK_DOMAINS[0] == "source"
    assert {"moon-real", "mars"} <= set(ROCK_DOMAINS)


@pytest.mark.parametrize("domain", ROCK_DOMAINS)
@pytest.mark.parametrize("image_size", [32, 64, (48, 80), (80, 48)])
def test_render_shapes_and_dtypes(domain, image_size):
    image, label = render_rock_scene(domain, np.random.default_rng(0), image_size)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert label.shape == (h, w) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) <= {0, 1, 2}


def test_render_large_size():
    image, label = render_rock_scene("mars", np.random.default_rng(0), 256)
    assert image.shape == (256, 256, 3) and label.shape == (256, 256)


@pytest.mark.parametrize("domain", ROCK_DOMAINS)
def test_render_deterministic(domain):
    a = render_rock_scene(domain, np.random.default_rng(123), SIZE)
    b = render_rock_scene(domain, np.random.default_rng(123), SIZE)
    c = render_rock_scene(domain, np.random.default_rng(124), SIZE)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("domain", ROCK_DOMAINS)
def test_every_class_present_in_20_samples(domain, scenes):
    labels = np.stack([lab for _, lab in scenes[domain]])
    # "moon-boulders" looks straight down: no horizon, so no sky (a different class set on purpose).
    expected = {0, 1} if domain == "moon-boulders" else {0, 1, 2}
    assert set(np.unique(labels).tolist()) == expected
    # Rocks are a minority class, but not a negligible one, in every domain.
    assert 0.03 < (labels == 1).mean() < 0.4


def test_sky_is_a_top_band(scenes):
    """Sky pixels only occur in the upper part, and no image has ground above its sky."""
    for domain in ROCK_DOMAINS:
        for _, label in scenes[domain]:
            rows = np.flatnonzero((label == 2).any(axis=1))
            if rows.size:
                assert rows[0] == 0 and rows[-1] < 0.5 * label.shape[0]
                assert (label[: rows[-1] + 1] != 0).all()


def test_render_is_fast():
    """Loose guard against de-vectorisation (typical: a few ms per 128 px scene)."""
    rng = np.random.default_rng(0)
    for domain in ROCK_DOMAINS:
        render_rock_scene(domain, rng, 128)
    start = time.perf_counter()
    for domain in ROCK_DOMAINS:
        for _ in range(5):
            render_rock_scene(domain, rng, 128)
    assert (time.perf_counter() - start) / (5 * len(ROCK_DOMAINS)) < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Domain statistics: the targets differ from the source in the documented ways
# ----------------------------------------------------------------------------------------------------------------------


def _domain_stats(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    red_minus_blue, ground_hf, rock_contrast, sky_level = [], [], [], []
    for image, label in samples:
        img = image.astype(np.float64)
        gray = img.mean(axis=2)
        ground, rock, sky = label == 0, label == 1, label == 2
        red_minus_blue.append((img[..., 0] - img[..., 2])[ground].mean())
        # Median |Laplacian| on ground pixels: ~0 for a smooth render, high for textured / noisy regolith.
        lap = np.abs(4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
        ground_hf.append(np.median(lap[ground[1:-1, 1:-1]]))
        rock_contrast.append((gray[rock].mean() - gray[ground].mean()) / gray[ground].mean())
        if sky.any():
            sky_level.append(gray[sky].mean())
    return {
        "red_minus_blue": float(np.mean(red_minus_blue)),
        "ground_hf": float(np.mean(ground_hf)),
        "rock_contrast": float(np.mean(rock_contrast)),
        "sky_level": float(np.mean(sky_level)),
    }


def test_domains_differ_statistically(scenes):
    stats = {d: _domain_stats(scenes[d]) for d in ROCK_DOMAINS}
    src = stats["source"]
    # Source: grey, smooth, rocks brighter than the ground, black sky.
    assert abs(src["red_minus_blue"]) < 2.0
    assert src["ground_hf"] < 4.0
    assert src["rock_contrast"] > 0.15
    assert src["sky_level"] < 10.0
    # Real Moon: still grey, but textured and noisy regolith, rocks less contrasted, sky lifted by the sensor.
    real = stats["moon-real"]
    assert abs(real["red_minus_blue"]) < 3.0
    assert real["ground_hf"] > 3.0 * src["ground_hf"] + 5.0
    assert abs(real["rock_contrast"]) < src["rock_contrast"]
    assert real["sky_level"] > src["sky_level"] + 10.0
    # Mars: strong red cast, rocks darker than the ground, bright dusty sky.
    mars = stats["mars"]
    assert mars["red_minus_blue"] > 40.0
    assert mars["rock_contrast"] < -0.1
    assert mars["sky_level"] > 100.0
    # High-sun Moon: textured, rocks barely contrasted once shading is flat.
    high = stats["moon-highsun"]
    assert high["ground_hf"] > 3.0 * src["ground_hf"] + 5.0
    assert abs(high["rock_contrast"]) < src["rock_contrast"]


def test_shadows_fall_on_opposite_sides(scenes):
    """Source sun is on the left (shadows to the right of rocks); moon-real sun is on the right (shadows left)."""

    def shadow_side(samples) -> float:
        # Mean brightness of ground just right of rock pixels minus ground just left of them: < 0 = shadow right.
        diffs = []
        for image, label in samples:
            gray = image.astype(np.float64).mean(axis=2)
            rock = label == 1
            shift = 3
            right = np.zeros_like(rock)
            right[:, shift:] = rock[:, :-shift]  # pixels `shift` px right of a rock pixel
            left = np.zeros_like(rock)
            left[:, :-shift] = rock[:, shift:]
            ground = label == 0
            diffs.append(gray[right & ground & ~left].mean() - gray[left & ground & ~right].mean())
        return float(np.mean(diffs))

    assert shadow_side(scenes["source"]) < -10.0
    assert shadow_side(scenes["moon-real"]) > 5.0


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------


def test_dataset_columns_and_modes():
    ds = load_rock_dataset("mars", "train", num_samples=3, image_size=(48, 64), seed=1)
    assert len(ds) == 3
    assert set(ds.column_names) == {"image", "label"}
    assert type(ds.features["image"]).__name__ == "Image"
    assert type(ds.features["label"]).__name__ == "Image"
    example = ds[0]
    assert isinstance(example["image"], Image.Image) and example["image"].mode == "RGB"
    assert isinstance(example["label"], Image.Image) and example["label"].mode == "L"
    assert example["image"].size == (64, 48)  # PIL size is (width, height)
    assert set(np.unique(np.asarray(example["label"])).tolist()) <= {0, 1, 2}


def test_dataset_deterministic_and_prefix_stable():
    a = _arrays(load_rock_dataset("moon-real", "train", num_samples=5, image_size=SIZE, seed=3))
    b = _arrays(load_rock_dataset("moon-real", "train", num_samples=5, image_size=SIZE, seed=3))
    c = _arrays(load_rock_dataset("moon-real", "train", num_samples=10, image_size=SIZE, seed=3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # Sample i does not depend on num_samples.
    np.testing.assert_array_equal(a[0], c[0][:5])
    np.testing.assert_array_equal(a[1], c[1][:5])
    # Another seed gives other scenes.
    d = _arrays(load_rock_dataset("moon-real", "train", num_samples=5, image_size=SIZE, seed=4))
    assert not any(np.array_equal(x, y) for x in a[0] for y in d[0])


def test_splits_and_domains_are_disjoint():
    splits = {s: _arrays(load_rock_dataset("source", s, num_samples=8, image_size=SIZE))[1] for s in ("train", "test")}
    splits["validation"] = _arrays(load_rock_dataset("source", "validation", num_samples=8, image_size=SIZE))[1]
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not any(np.array_equal(x, y) for x in splits[first] for y in splits[second]), (first, second)
    # Two domains with the same scene statistics still draw different scenes.
    real = _arrays(load_rock_dataset("moon-real", "train", num_samples=8, image_size=SIZE))[1]
    assert not any(np.array_equal(x, y) for x in splits["train"] for y in real)


def test_load_rock_datasets():
    dd = load_rock_datasets("source", num_samples={"train": 3, "validation": 2, "test": 1}, image_size=SIZE)
    assert {k: len(v) for k, v in dd.items()} == {"train": 3, "validation": 2, "test": 1}
    single = load_rock_dataset("source", "validation", num_samples=2, image_size=SIZE)
    np.testing.assert_array_equal(_arrays(dd["validation"])[0], _arrays(single)[0])


# ----------------------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": "venus"}, r"`domain`='venus'.*source"),
        ({"split": "dev"}, r"`split`='dev'.*validation"),
        ({"num_samples": 0}, r"`num_samples`=0.*>= 1"),
        ({"num_samples": 2.5}, r"`num_samples`=2.5"),
        ({"image_size": 16}, r"`image_size`=16.*>= 32"),
        ({"image_size": (64, 16)}, r"`image_size`=\(64, 16\).*>= 32"),
        ({"image_size": "large"}, r"`image_size`='large'"),
        ({"image_size": (64, 64, 3)}, r"`image_size`=\(64, 64, 3\)"),
        ({"seed": -1}, r"`seed`=-1"),
    ],
)
def test_load_rock_dataset_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_rock_dataset(**{"num_samples": 1, "image_size": 32, **kwargs})


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`domain`='moon'.*moon-real"):
        render_rock_scene("moon", np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"`image_size`=31"):
        render_rock_scene("source", np.random.default_rng(0), 31)
    with pytest.raises(ValueError, match=r"`image_size`=True"):
        render_rock_scene("source", np.random.default_rng(0), True)


def test_load_rock_datasets_missing_split_count():
    with pytest.raises(ValueError, match=r"`num_samples`=.*'test'"):
        load_rock_datasets("source", num_samples={"train": 1, "validation": 1}, image_size=SIZE)


# ----------------------------------------------------------------------------------------------------------------------
# Transforms and collation
# ----------------------------------------------------------------------------------------------------------------------


def _batch(n: int = 3, size: tuple[int, int] = (40, 56)) -> dict[str, list[Image.Image]]:
    ds = load_rock_dataset("source", "train", num_samples=n, image_size=size)
    return ds[:n]


def test_transform_shapes_dtypes_and_normalisation():
    batch = _batch()
    out = SegmentationTransform()(batch)
    assert set(out) == {"pixel_values", "labels"}
    assert len(out["pixel_values"]) == len(out["labels"]) == 3
    for pixels, labels, image, label in zip(out["pixel_values"], out["labels"], batch["image"], batch["label"]):
        assert pixels.shape == (3, 40, 56) and pixels.dtype == torch.float32
        assert labels.shape == (40, 56) and labels.dtype == torch.int64
        np.testing.assert_array_equal(labels.numpy(), np.asarray(label))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        expected = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).astype(np.float32) / 255.0)
        torch.testing.assert_close(pixels * std + mean, expected, atol=1e-5, rtol=0)


def test_transform_single_example():
    batch = _batch(1)
    out = SegmentationTransform()({"image": batch["image"][0], "label": batch["label"][0]})
    assert out["pixel_values"].shape == (3, 40, 56)
    assert out["labels"].shape == (40, 56)


def test_augment_flip_is_applied_to_image_and_label():
    batch = _batch()
    plain = SegmentationTransform()(batch)
    flipped = SegmentationTransform(augment=True, seed=0, flip_prob=1.0, brightness=0.0, contrast=0.0)(batch)
    for p, f in zip(plain["pixel_values"], flipped["pixel_values"]):
        torch.testing.assert_close(f, p.flip(-1), atol=1e-5, rtol=0)
    for p, f in zip(plain["labels"], flipped["labels"]):
        assert torch.equal(f, p.flip(-1))


def test_augment_keeps_image_and_label_aligned():
    """With random flips and jitter, the label still marks the same (bright, left-half) pixels of the image."""
    img = np.zeros((32, 48, 3), dtype=np.uint8)
    img[:, :20] = 200
    img[:, 20:] = 60
    lab = np.zeros((32, 48), dtype=np.uint8)
    lab[:, :20] = 1
    batch = {"image": [Image.fromarray(img)] * 16, "label": [Image.fromarray(lab)] * 16}
    out = SegmentationTransform(augment=True, seed=1)(batch)
    flips = 0
    for pixels, labels in zip(out["pixel_values"], out["labels"]):
        gray = pixels.mean(0)
        assert gray[labels == 1].min() > gray[labels == 0].max()
        flips += int(labels[0, -1] == 1)
        assert torch.equal(labels.unique(), torch.tensor([0, 1]))
    assert 0 < flips < 16  # both flipped and unflipped examples occurred
    # Jitter changes intensities but stays small.
    base = SegmentationTransform()(batch)["pixel_values"][0]
    assert any(not torch.allclose(p.abs().mean(), base.abs().mean()) for p in out["pixel_values"])


def test_augment_is_reproducible_with_seed():
    batch = _batch()
    a = SegmentationTransform(augment=True, seed=5)(batch)
    b = SegmentationTransform(augment=True, seed=5)(batch)
    for x, y in zip(a["pixel_values"], b["pixel_values"]):
        assert torch.equal(x, y)


def test_with_transform_and_collate():
    ds = load_rock_dataset("moon-highsun", "test", num_samples=4, image_size=(40, 56))
    ds = ds.with_transform(SegmentationTransform())
    examples = [ds[i] for i in range(len(ds))]
    batch = collate_segmentation(examples)
    assert batch["pixel_values"].shape == (4, 3, 40, 56) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (4, 40, 56) and batch["labels"].dtype == torch.int64


def test_collate_rejects_empty():
    with pytest.raises(ValueError, match="`examples`"):
        collate_segmentation([])


def test_transform_rejects_bad_normalisation():
    with pytest.raises(ValueError, match="`image_mean`"):
        SegmentationTransform(image_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="`image_std`"):
        SegmentationTransform(image_std=(0.5, 0.0, 0.5))
