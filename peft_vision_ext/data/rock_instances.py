"""Rock *instances*: the rock-field domains of :mod:`~peft_vision_ext.data.rocks` with one mask and one class per rock.

The scenes come from the same renderer, so the domain shifts (sensor, illumination, Mars vs Moon, looking down on
boulders) are those described in :mod:`~peft_vision_ext.data.rocks`. Two things change for instance segmentation:

* **Layout.** A rock field of 30 pebbles per frame is a semantic-segmentation scene, not an instance-segmentation one
  (each pebble would need its own query). Instance scenes draw fewer and larger rocks (``_INSTANCE_LAYOUT``): about
  0-15 (about 5 on average) rocks per frame in the lunar domains, about 7 on Mars, a few boulders in
  ``"moon-boulders"``; the smallest annotated rocks cover about 50 pixels at 128 px.
* **Classes** (``ROCK_INSTANCE_LABELS``): a rock is a ``"boulder"`` when its *true* radius (before perspective) is at
  least ``BOULDER_RADIUS`` of the frame, else a ``"rock"``, the size classes of rover hazard maps. Far boulders look
  small, so the class is not the apparent size alone: a model has to use the depth cue of the row position. The
  class mix shifts with the domain (Mars: almost only rocks; ``"moon-boulders"``: almost only boulders).

Each visible rock with at least ``min_area`` pixels is one instance; smaller visible fragments (rocks hidden behind a
nearer one, specks at the horizon) are left unannotated, like COCO's unlabelled clutter. Sky and ground are
background: Mask2Former's "no object" class.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from .rocks import (
    _STYLES,
    _check_dataset_arguments,
    _check_domain,
    _check_image_size,
    _is_int,
    _render_scene,
    _sample_seed,
)


if TYPE_CHECKING:
    import datasets


__all__ = [
    "BOULDER_RADIUS",
    "MAX_INSTANCES",
    "ROCK_INSTANCE_LABELS",
    "load_rock_instance_dataset",
    "render_rock_instances",
]

ROCK_INSTANCE_LABELS: dict[int, str] = {0: "rock", 1: "boulder"}
"""``id2label`` of the rock instances (Mask2Former adds its "no object" class after these)."""

BOULDER_RADIUS: float = 0.08
"""True rock radius, as a fraction of ``min(H, W)``, from which a rock is a ``"boulder"``."""

MAX_INSTANCES: int = 255
"""Instance ids are stored in an 8-bit map, so one scene holds at most this many instances."""

# Fewer, larger rocks than the semantic scenes: (rock_count, rock_radius) per domain.
_INSTANCE_LAYOUT: dict[str, dict[str, Any]] = {
    "source": {"rock_count": (4.0, 9.0), "rock_radius": (0.05, 0.18)},
    "moon-real": {"rock_count": (4.0, 9.0), "rock_radius": (0.05, 0.18)},
    "moon-highsun": {"rock_count": (4.0, 9.0), "rock_radius": (0.05, 0.18)},
    "mars": {"rock_count": (8.0, 14.0), "rock_radius": (0.045, 0.12)},
    "moon-boulders": {},
}
_INSTANCE_STYLES = {
    domain: dataclasses.replace(_STYLES[domain], **layout) for domain, layout in _INSTANCE_LAYOUT.items()
}


def render_rock_instances(
    domain: str, rng: np.random.Generator, image_size: int | tuple[int, int] = 128, min_area: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one instance-annotated rock scene of ``domain``.

    Args:
        domain: one of ``ROCK_DOMAINS``.
        rng: source of all randomness; the same generator state yields the same scene.
        image_size: ``int`` for square images or ``(height, width)``; each side at least 32.
        min_area: visible pixels a rock needs to be annotated (>= 1).

    Returns:
        ``(image, instance_map, classes)``: ``image`` is ``uint8`` ``(H, W, 3)``; ``instance_map`` is ``uint8``
        ``(H, W)`` with 0 on background and ``k`` on the pixels of instance ``k`` (1-based, far to near);
        ``classes`` is ``int64`` ``(num_instances,)``, the ``ROCK_INSTANCE_LABELS`` id of instance ``k`` at
        index ``k - 1``.
    """
    if not _is_int(min_area) or min_area < 1:
        raise ValueError(f"Invalid `min_area`={min_area!r}; expected an int >= 1 (pixels).")
    style = _INSTANCE_STYLES[_check_domain(domain)]
    image, _, rocks, rock_size = _render_scene(style, rng, *_check_image_size(image_size))
    area = np.bincount(rocks.reshape(-1), minlength=rock_size.size + 1)[1:]
    kept = np.flatnonzero(area >= min_area)
    if kept.size > MAX_INSTANCES:
        raise ValueError(
            f"The scene has {kept.size} rocks of at least `min_area`={min_area} pixels, more than the {MAX_INSTANCES} "
            "an 8-bit instance map holds; raise `min_area` or lower `image_size`."
        )
    relabel = np.zeros(rock_size.size + 1, dtype=np.uint8)
    relabel[kept + 1] = np.arange(1, kept.size + 1, dtype=np.uint8)
    classes = (rock_size[kept] >= BOULDER_RADIUS).astype(np.int64)
    return image, relabel[rocks], classes


def load_rock_instance_dataset(
    domain: str = "source",
    split: str = "train",
    num_samples: int = 200,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    min_area: int = 32,
) -> datasets.Dataset:
    """Render ``num_samples`` instance-annotated scenes of ``domain`` into an in-memory Hugging Face dataset.

    Sample ``i`` depends only on ``(seed, domain, split, i)`` (not on ``num_samples``); the streams are separate from
    the semantic scenes of :func:`~peft_vision_ext.data.load_rock_dataset`.

    Returns:
        ``datasets.Dataset`` with columns ``image`` (RGB PIL image), ``instance_map`` (mode ``"L"`` PIL image of
        instance ids, 0 = background) and ``instance_classes`` (list of class ids, entry ``k - 1`` for instance
        ``k``). :class:`~peft_vision_ext.data.InstanceSegmentationTransform` turns them into Mask2Former inputs.
    """
    import datasets
    from PIL import Image

    size = _check_dataset_arguments(domain, split, num_samples, image_size, seed)

    images, maps, classes = [], [], []
    for index in range(int(num_samples)):
        rng = np.random.default_rng(_sample_seed(seed, f"instances|{domain}", split, index))
        image, instance_map, instance_classes = render_rock_instances(domain, rng, size, min_area)
        images.append(Image.fromarray(image))
        maps.append(Image.fromarray(instance_map))
        classes.append(instance_classes.tolist())
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "instance_map": datasets.Image(),
            "instance_classes": datasets.Sequence(datasets.Value("int64")),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "instance_map": maps, "instance_classes": classes}, features=features
    )
