"""Procedural "rock-field" scenes for domain-adaptive rock segmentation.

This module imitates the setting of adapting U-Nets for rock segmentation on the Moon and Mars: a model is pretrained
on a clean synthetic lunar render and adapted to real lunar images and to Mars images. Instead of shipping (or
downloading) image data, every scene is rendered on the fly with vectorised numpy, so the data is embedded, fully
deterministic and available offline.

A scene is a ground plane seen obliquely (rocks shrink and flatten towards the horizon), optionally with a sky band
above the horizon, strewn with rocks whose sizes follow a heavy-tailed distribution (many pebbles, few boulders).
Rocks are shaded with a Lambertian sun and cast a shadow on the ground. Labels (``ROCK_LABELS``):

* ``0`` -- "ground" (regolith / soil, including cast shadows on it),
* ``1`` -- "rock",
* ``2`` -- "sky".

Domains (``ROCK_DOMAINS``) share the label semantics but differ in how the scene is generated and imaged:

``"source"``
    A clean synthetic render, like a game-engine image: smooth grey ground with a mild illumination gradient and
    gentle low-frequency albedo / relief variation (no fine texture), blob-like rocks (random star-shaped outlines
    smoothed with a few low-order harmonics) brighter than the ground, one sun from the upper left at a moderate
    elevation so hard cast shadows fall to the lower right, black sky, no noise, no blur.
``"moon-real"``
    The same scene statistics (rock shapes, sizes, density) but a sensor and illumination shift, as between a render
    and a real lunar camera: the sun comes from the opposite side and lower (long shadows on the other side of the
    rocks), the regolith has multi-scale texture, pixel grain and small craters (ring-shaped distractors), rocks
    have a slightly *lower* albedo than the ground and more scattered light (lower rock/ground contrast), and the
    image goes through a random contrast compression (which also lifts the black sky), gamma and exposure change,
    Gaussian plus shot noise and a slight blur.
``"mars"``
    A different planet: a butterscotch / reddish ground with darker brownish rocks (rocks are darker than the ground,
    the opposite of the source), a pinkish-butterscotch sky, dust haze that veils the scene more towards the horizon,
    softer shadows from the brighter dusty sky, soil texture, and a different rock population: angular polygonal
    outlines with faceted shading, elongated, flatter, and more numerous and smaller on average.
``"moon-highsun"``
    A cheap extra lunar target: the sun is high and from any azimuth (short shadows close to the rock foot, rocks
    lit from above, so the shading cue of the source almost vanishes), fresh rocks have a somewhat higher albedo
    than the mature regolith, the ground is textured and cratered and the exposure is washed out; mild noise and
    blur.
``"moon-boulders"``
    A shift in class set, segment size and sensor: a down-looking view with no horizon (only the classes ground and
    rock), a few large boulders instead of a field of small rocks, through a noisy, blurry camera; otherwise the
    lunar look of ``"moon-real"``.

All randomness comes from the ``numpy.random.Generator`` passed in, so a scene is reproducible from its seed.
``load_rock_dataset`` wraps the renderer into a Hugging Face ``datasets.Dataset`` whose sample ``i`` is seeded by a
stable hash of ``(seed, domain, split, i)``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    import datasets


__all__ = [
    "ROCK_DOMAINS",
    "ROCK_IGNORE_INDEX",
    "ROCK_LABELS",
    "ROCK_SPLITS",
    "load_rock_dataset",
    "load_rock_datasets",
    "render_rock_scene",
]

ROCK_LABELS: dict[int, str] = {0: "ground", 1: "rock", 2: "sky"}
"""``id2label`` mapping of the rock-field scenes."""

ROCK_IGNORE_INDEX: int = 255
"""Label value reserved for "ignore" pixels. The renderer never emits it; it is exported for losses and metrics."""

ROCK_DOMAINS: tuple[str, ...] = ("source", "moon-real", "mars", "moon-highsun", "moon-boulders")
"""Available domains: the synthetic pretraining domain first, then the adaptation targets."""

ROCK_SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Available dataset splits. Each split draws its scenes from its own seed stream."""

_MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class _DomainStyle:
    """Parameters (mostly ``(low, high)`` ranges sampled per image) of one domain's generative process."""

    # --- scene layout --------------------------------------------------------------------------------------------
    sky_prob: float  # probability that the image shows the horizon and a sky band
    rock_count: tuple[float, float]  # Poisson mean of the number of rocks for a full ground frame
    rock_radius: tuple[float, float]  # min / max rock radius at the bottom row, as a fraction of min(H, W)
    size_skew: float  # exponent > 1 skews the log-uniform radius towards small rocks
    elongation: tuple[float, float]  # ratio between the long and short axis of the rock outline
    angular: bool  # polygonal outline + faceted shading (Mars) instead of smooth blobs
    roughness: float  # harmonic amplitude (smooth) or vertex radius jitter (angular) of the outline
    flatness: float  # > 1 makes rocks flatter: normals point up more, shadows are shorter
    # --- illumination -----------------------------------------------------------------------------------------------
    sun_azimuth: tuple[float, float]  # degrees, direction *towards* the sun in image axes (x right, y down)
    sun_elevation: tuple[float, float]  # degrees above the horizon
    ambient: float  # diffuse sky / scattered light, also the brightness of cast shadows
    rock_fill: float  # extra sky light on the upward-facing rock tops
    bounce: float  # light reflected by the sunlit ground onto the rock flanks (lifts them above cast shadows)
    shadow_blur: int  # blur passes (at 128 px) of the cast-shadow mask: 0 = hard shadows
    # --- materials --------------------------------------------------------------------------------------------------
    ground_color: tuple[float, float, float]  # RGB albedo of the ground
    rock_color: tuple[float, float, float]  # RGB albedo of the rocks (before per-rock jitter)
    rock_albedo_jitter: float  # relative per-rock albedo variation
    color_jitter: float  # per-image relative RGB jitter of the palette (white balance / mineralogy)
    ground_level: tuple[float, float]  # target brightness of the sunlit ground after exposure
    gradient: float  # amplitude of the large-scale linear illumination gradient over the image
    relief: float  # amplitude of smooth, large-scale terrain shading (gentle undulations, noise-free)
    texture: float  # amplitude of multi-scale ground texture (0 = perfectly smooth render)
    texture_octaves: int  # finest texture scale is min(H, W) / (6 * 2 ** (octaves - 1))
    craters: tuple[float, float]  # Poisson mean of small craters per full ground frame ((0, 0) = none)
    grain: float  # amplitude of pixel-scale texture on ground and rocks
    rock_texture: float  # amplitude of texture on rocks
    sky_top: tuple[float, float, float]  # RGB of the sky at the top row
    sky_horizon: tuple[float, float, float]  # RGB of the sky just above the horizon
    # --- atmosphere and sensor ----------------------------------------------------------------------------------------
    haze: tuple[float, float]  # veil strength at the horizon (0 = airless)
    haze_color: tuple[float, float, float]
    contrast: tuple[float, float]  # contrast factor around the mean (< 1 compresses)
    gamma: tuple[float, float]
    exposure: tuple[float, float]
    noise_sigma: tuple[float, float]  # Gaussian read noise std (in [0, 1] intensity units)
    shot_noise: float  # std of signal-dependent noise at intensity 1 (scales with sqrt(intensity))
    blur: int  # blur passes (at 128 px) of the final image


_STYLES: dict[str, _DomainStyle] = {
    # Clean render: smooth grey ground, bright smooth rocks, sun from the upper left, hard shadows to the lower right.
    # The gentle low-frequency ground variation keeps "perfectly flat = ground" from being the only learnable cue.
    "source": _DomainStyle(
        sky_prob=0.5,
        rock_count=(22.0, 34.0),
        rock_radius=(0.012, 0.15),
        size_skew=1.6,
        elongation=(1.0, 1.4),
        angular=False,
        roughness=0.12,
        flatness=1.0,
        sun_azimuth=(200.0, 245.0),
        sun_elevation=(25.0, 45.0),
        ambient=0.12,
        rock_fill=0.15,
        bounce=0.1,
        shadow_blur=0,
        ground_color=(0.5, 0.5, 0.5),
        rock_color=(0.56, 0.56, 0.56),
        rock_albedo_jitter=0.15,
        color_jitter=0.0,
        ground_level=(0.36, 0.5),
        gradient=0.12,
        relief=0.08,
        texture=0.08,
        texture_octaves=3,
        craters=(0.0, 0.0),
        grain=0.0,
        rock_texture=0.0,
        sky_top=(0.0, 0.0, 0.0),
        sky_horizon=(0.02, 0.02, 0.02),
        haze=(0.0, 0.0),
        haze_color=(0.0, 0.0, 0.0),
        contrast=(1.0, 1.0),
        gamma=(1.0, 1.0),
        exposure=(1.0, 1.0),
        noise_sigma=(0.0, 0.0),
        shot_noise=0.0,
        blur=0,
    ),
    # Real lunar camera: same scene statistics, opposite and lower sun, textured regolith, rock albedo close to the
    # ground, contrast compression, gamma/exposure changes, noise and blur.
    "moon-real": _DomainStyle(
        sky_prob=0.5,
        rock_count=(22.0, 34.0),
        rock_radius=(0.012, 0.15),
        size_skew=1.6,
        elongation=(1.0, 1.4),
        angular=False,
        roughness=0.12,
        flatness=1.0,
        sun_azimuth=(-20.0, 35.0),
        sun_elevation=(10.0, 22.0),
        ambient=0.28,
        rock_fill=0.1,
        bounce=0.22,
        shadow_blur=0,
        ground_color=(0.5, 0.5, 0.5),
        rock_color=(0.45, 0.45, 0.45),
        rock_albedo_jitter=0.1,
        color_jitter=0.04,
        ground_level=(0.38, 0.55),
        gradient=0.2,
        relief=0.08,
        texture=0.15,
        texture_octaves=5,
        craters=(6.0, 14.0),
        grain=0.05,
        rock_texture=0.08,
        sky_top=(0.0, 0.0, 0.0),
        sky_horizon=(0.04, 0.04, 0.04),
        haze=(0.0, 0.0),
        haze_color=(0.0, 0.0, 0.0),
        contrast=(0.7, 0.9),
        gamma=(0.7, 1.4),
        exposure=(0.8, 1.25),
        noise_sigma=(0.008, 0.02),
        shot_noise=0.02,
        blur=1,
    ),
    # Mars: butterscotch soil, darker brownish angular rocks, pinkish sky, dust haze, softer shadows, more and
    # smaller, flatter, elongated rocks.
    "mars": _DomainStyle(
        sky_prob=0.6,
        rock_count=(45.0, 70.0),
        rock_radius=(0.01, 0.11),
        size_skew=2.0,
        elongation=(1.2, 2.2),
        angular=True,
        roughness=0.18,
        flatness=1.8,
        sun_azimuth=(0.0, 360.0),
        sun_elevation=(25.0, 60.0),
        ambient=0.35,
        rock_fill=0.1,
        bounce=0.1,
        shadow_blur=1,
        ground_color=(0.7, 0.5, 0.34),
        rock_color=(0.42, 0.29, 0.22),
        rock_albedo_jitter=0.15,
        color_jitter=0.06,
        ground_level=(0.42, 0.54),
        gradient=0.1,
        relief=0.08,
        texture=0.18,
        texture_octaves=5,
        craters=(0.0, 0.0),
        grain=0.05,
        rock_texture=0.1,
        sky_top=(0.7, 0.55, 0.5),
        sky_horizon=(0.86, 0.7, 0.56),
        haze=(0.2, 0.4),
        haze_color=(0.82, 0.62, 0.46),
        contrast=(0.85, 1.0),
        gamma=(0.9, 1.1),
        exposure=(0.95, 1.05),
        noise_sigma=(0.005, 0.015),
        shot_noise=0.01,
        blur=1,
    ),
    # High-sun Moon: short shadows, flat lighting, rocks brighter than the mature regolith, washed-out exposure.
    "moon-highsun": _DomainStyle(
        sky_prob=0.4,
        rock_count=(22.0, 34.0),
        rock_radius=(0.012, 0.15),
        size_skew=1.6,
        elongation=(1.0, 1.4),
        angular=False,
        roughness=0.12,
        flatness=1.0,
        sun_azimuth=(0.0, 360.0),
        sun_elevation=(62.0, 82.0),
        ambient=0.15,
        rock_fill=0.0,
        bounce=0.15,
        shadow_blur=0,
        ground_color=(0.5, 0.5, 0.5),
        rock_color=(0.72, 0.72, 0.72),
        rock_albedo_jitter=0.1,
        color_jitter=0.03,
        ground_level=(0.55, 0.68),
        gradient=0.15,
        relief=0.08,
        texture=0.15,
        texture_octaves=5,
        craters=(6.0, 14.0),
        grain=0.04,
        rock_texture=0.05,
        sky_top=(0.0, 0.0, 0.0),
        sky_horizon=(0.03, 0.03, 0.03),
        haze=(0.0, 0.0),
        haze_color=(0.0, 0.0, 0.0),
        contrast=(0.7, 0.9),
        gamma=(0.8, 1.1),
        exposure=(1.0, 1.2),
        noise_sigma=(0.005, 0.015),
        shot_noise=0.02,
        blur=1,
    ),
}


_STYLES["moon-boulders"] = dataclasses.replace(
    _STYLES["moon-real"],
    sky_prob=0.0,
    rock_count=(3.0, 6.0),
    rock_radius=(0.08, 0.3),
    size_skew=1.0,
    noise_sigma=(0.03, 0.05),
    blur=2,
)

# ----------------------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------------------


def _check_domain(domain: str) -> str:
    if domain not in _STYLES:
        raise ValueError(f"Unknown `domain`={domain!r}; expected one of {ROCK_DOMAINS}.")
    return domain


def _check_split(split: str) -> str:
    if split not in ROCK_SPLITS:
        raise ValueError(f"Unknown `split`={split!r}; expected one of {ROCK_SPLITS}.")
    return split


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """Normalise ``image_size`` to ``(height, width)``, each at least ``_MIN_IMAGE_SIZE`` pixels."""
    hint = f"pass an int >= {_MIN_IMAGE_SIZE} or a (height, width) tuple of ints >= {_MIN_IMAGE_SIZE}"
    if _is_int(image_size):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(_is_int(s) for s in image_size):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"Invalid `image_size`={image_size!r}; {hint}.")
    if min(size) < _MIN_IMAGE_SIZE:
        raise ValueError(f"`image_size`={image_size!r} is too small; {hint}.")
    return size


# ----------------------------------------------------------------------------------------------------------------------
# Small vectorised image helpers
# ----------------------------------------------------------------------------------------------------------------------


def _check_dataset_arguments(
    domain: str, split: str, num_samples: int, image_size: int | tuple[int, int], seed: int
) -> tuple[int, int]:
    """Validate the arguments every rock dataset loader takes; returns ``(height, width)``."""
    _check_domain(domain)
    _check_split(split)
    if not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"Invalid `num_samples`={num_samples!r}; expected an int >= 1.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"Invalid `seed`={seed!r}; expected a non-negative int.")
    return _check_image_size(image_size)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    low, high = bounds
    # Always draws, even for a degenerate range, so a style's constants do not change how its stream is consumed.
    return float(low + (high - low) * rng.random())


def _interp_weights(n: int, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid index and smoothstep-eased weight of pixel positions ``arange(n) / cell`` for linear interpolation."""
    pos = np.arange(n, dtype=np.float32) / cell
    i0 = pos.astype(np.int64)
    f = pos - i0
    # Smoothstep easing hides the grid structure of plain linear interpolation.
    return i0, f * f * (3.0 - 2.0 * f)


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth value noise in about [-1, 1] with features of ``cell`` pixels.

    Separable interpolation of a random grid: first along x on the small grid, then along y by gathering whole
    rows (contiguous copies), which is much cheaper than gathering four neighbours per pixel. No BLAS on purpose:
    threaded BLAS behaves erratically on busy machines and inside data-loader workers.
    """
    cell = max(cell, 1.0)
    grid = rng.uniform(-1.0, 1.0, size=(int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    x0, fx = _interp_weights(width, cell)
    y0, fy = _interp_weights(height, cell)
    cols = grid[:, x0] * (1.0 - fx) + grid[:, x0 + 1] * fx  # (grid_h, width)
    return cols[y0] * (1.0 - fy)[:, None] + cols[y0 + 1] * fy[:, None]


def _fractal_noise(rng: np.random.Generator, height: int, width: int, base_cell: float, octaves: int) -> np.ndarray:
    """Multi-scale (fBm-like) noise: octaves of value noise halving in size and amplitude, normalised to ~unit std."""
    total = np.zeros((height, width), dtype=np.float32)
    amplitude, norm, cell = 1.0, 0.0, base_cell
    for _ in range(octaves):
        if cell < 1.0:
            break
        total += amplitude * _value_noise(rng, height, width, cell)
        norm += amplitude**2
        amplitude *= 0.75
        cell /= 2.0
    # Value noise has std ~0.35 per octave; rescale so the texture amplitudes in the styles mean roughly "1 std".
    return total / (0.35 * math.sqrt(max(norm, 1e-6)))


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge padding, repeated ``passes`` times (works on (H, W) and (H, W, C))."""
    for _ in range(passes):
        pad = np.concatenate([img[:1], img, img[-1:]], axis=0)
        img = 0.25 * pad[:-2] + 0.5 * pad[1:-1] + 0.25 * pad[2:]
        pad = np.concatenate([img[:, :1], img, img[:, -1:]], axis=1)
        img = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
    return img


def _scaled_passes(passes: int, scale: float) -> int:
    """Blur passes scaled with resolution so blur is a constant fraction of the image (variance grows linearly)."""
    if passes <= 0:
        return 0
    return max(1, int(round(passes * scale * scale)))


def _soft_clip(img: np.ndarray) -> np.ndarray:
    """Highlight roll-off instead of a hard clip, like a camera/tone curve; identity below 0.8."""
    knee = 0.8
    over = img > knee
    if over.any():
        img = img.copy()
        img[over] = knee + (1.0 - knee) * np.tanh((img[over] - knee) / (1.0 - knee))
    return np.clip(img, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Scene rendering
# ----------------------------------------------------------------------------------------------------------------------


def _ragged_boxes(
    y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Enumerate the pixels of many boxes (float bounds, clipped to the image) as one flat list.

    Returns ``(ids, py, px)`` (int64): for every pixel of every box, in box order, the box index and the pixel's row
    and column.
    """
    y0 = np.clip(np.floor(y0), 0, height).astype(np.int64)
    y1 = np.clip(np.ceil(y1) + 1, 0, height).astype(np.int64)
    x0 = np.clip(np.floor(x0), 0, width).astype(np.int64)
    x1 = np.clip(np.ceil(x1) + 1, 0, width).astype(np.int64)
    ny = np.maximum(y1 - y0, 0)
    nx = np.maximum(x1 - x0, 0)
    sizes = ny * nx
    ids = np.repeat(np.arange(sizes.size), sizes)
    starts = np.cumsum(sizes) - sizes
    k = np.arange(ids.size) - starts[ids]
    nxi = nx[ids]
    py = y0[ids] + k // nxi
    px = x0[ids] + k % nxi
    return ids, py, px


def _crater_relief(
    rng: np.random.Generator,
    style: _DomainStyle,
    horizon: float,
    depth: np.ndarray,
    light: np.ndarray,
    height: int,
    width: int,
) -> np.ndarray:
    """Multiplicative ground-irradiance map of small impact craters (bowl + raised rim), part of the "ground" class.

    Crater walls facing the sun are bright and walls facing away dark, like rock flanks, so they are realistic
    distractors that a model must tell apart from rocks by shape (ring, no cast shadow) rather than by brightness.
    """
    size = float(min(height, width))
    top = max(horizon, 0.0)
    n = int(rng.poisson(_uniform(rng, style.craters) * (height - top) / height * width / height))
    base = 0.015 * (0.08 / 0.015) ** rng.random(n) * size
    cy = top + (height - top) * rng.random(n)
    cx = rng.uniform(0.0, 1.0, n) * width
    scale = np.interp(cy, np.arange(height, dtype=np.float32), depth)
    radius = base * scale
    keep = radius >= 1.5
    cy, cx, radius, scale = (x[keep].astype(np.float32) for x in (cy, cx, radius, scale))
    squash = 0.5 + 0.45 * scale
    ext = 1.35 * radius + 1.0
    ids, py, px = _ragged_boxes(cy - ext * squash, cy + ext * squash, cx - ext, cx + ext, height, width)
    v = (py.astype(np.float32) - cy[ids]) / squash[ids]
    u = px.astype(np.float32) - cx[ids]
    r = np.hypot(u, v) / radius[ids]
    inside = r < 1.3
    ids, py, px, u, v, r = ids[inside], py[inside], px[inside], u[inside], v[inside], r[inside]
    ang = np.arctan2(v, u)
    # Slope points inwards in the bowl (r < 1) and outwards on the rim (1 <= r < 1.3).
    slope = np.where(r < 1.0, -0.9 * r, 0.6 * (1.3 - r) / 0.3)
    nx, ny = slope * np.cos(ang), slope * np.sin(ang)
    inv = 1.0 / np.sqrt(nx * nx + ny * ny + 1.0)
    lambert = np.clip((nx * light[0] + ny * light[1] + light[2]) * inv, 0.0, None)
    relief = np.ones((height, width), dtype=np.float32)
    flat_irr = style.ambient + float(light[2])
    relief[py, px] = (style.ambient + lambert) / flat_irr
    return relief


def render_rock_scene(
    domain: str, rng: np.random.Generator, image_size: int | tuple[int, int] = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Render one rock-field scene of ``domain``.

    Args:
        domain: one of ``ROCK_DOMAINS`` (see the module docstring for each domain's generative shift).
        rng: source of all randomness; the same generator state yields the same scene.
        image_size: ``int`` for square images or ``(height, width)``; each side must be at least 32.

    Returns:
        ``(image, label)``: ``image`` is ``uint8`` of shape ``(H, W, 3)``, ``label`` is ``uint8`` of shape ``(H, W)``
        with class ids from ``ROCK_LABELS`` (0 ground, 1 rock, 2 sky).
    """
    style = _STYLES[_check_domain(domain)]
    image, label, _, _ = _render_scene(style, rng, *_check_image_size(image_size))
    return image, label


def _render_scene(
    style: _DomainStyle, rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render one scene of ``style``: ``(image, label, instances, rock_size)``.

    ``instances`` (int32, ``(H, W)``) holds ``k + 1`` on the visible pixels of the ``k``-th rock in drawing order
    (far to near) and 0 elsewhere; ``rock_size[k]`` is that rock's true radius (before perspective) as a fraction of
    ``min(H, W)``. Both are by-products of the rasterisation and draw nothing from ``rng``.
    """
    size = float(min(height, width))
    res = size / 128.0  # resolution factor: blur and feature sizes are defined at 128 px

    # --- camera / horizon -----------------------------------------------------------------------------------------
    # With a sky, the horizon is inside the frame; without, the (virtual) horizon lies above the frame, giving a
    # milder perspective, like a camera tilted towards the ground.
    has_sky = rng.random() < style.sky_prob
    if has_sky:
        horizon = height * _uniform(rng, (0.15, 0.4))
    else:
        horizon = -height * _uniform(rng, (0.6, 2.0))
    rows = np.arange(height, dtype=np.float32)
    # depth[y] is the apparent scale of ground objects at row y (1 at the bottom row, 0 at the horizon).
    depth = np.clip((rows - horizon) / (height - horizon), 0.0, 1.0)

    # --- illumination -------------------------------------------------------------------------------------------------
    azimuth = math.radians(_uniform(rng, style.sun_azimuth))
    elevation = math.radians(_uniform(rng, style.sun_elevation))
    light = np.array(
        [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)],
        dtype=np.float32,
    )
    ground_irradiance = style.ambient + light[2]  # a flat ground facet sees ambient + sun * sin(elevation)

    # --- palette --------------------------------------------------------------------------------------------------
    tint = 1.0 + style.color_jitter * rng.uniform(-1.0, 1.0, 3)
    ground_rgb = np.asarray(style.ground_color, dtype=np.float32) * tint
    rock_rgb = np.asarray(style.rock_color, dtype=np.float32) * tint
    exposure = _uniform(rng, style.ground_level) / (float(ground_rgb.mean()) * ground_irradiance)

    # --- ground albedo: palette x large-scale gradient x multi-scale texture -----------------------------------------
    gdir = rng.uniform(0.0, 2.0 * np.pi)
    yy = (rows[:, None] / height - 0.5) * math.sin(gdir)
    xx = (np.arange(width, dtype=np.float32)[None, :] / width - 0.5) * math.cos(gdir)
    shade = 1.0 + style.gradient * 2.0 * (yy + xx)
    if style.relief > 0.0:
        shade = shade * (1.0 + style.relief * _value_noise(rng, height, width, size / 2.5) / 0.35)
    if style.texture > 0.0:
        shade = shade * (1.0 + style.texture * _fractal_noise(rng, height, width, size / 6.0, style.texture_octaves))
    grain = None
    if style.grain > 0.0:
        grain = style.grain * rng.standard_normal((height, width), dtype=np.float32)
        shade = shade + grain
    if style.craters[1] > 0.0:
        shade = shade * _crater_relief(rng, style, horizon, depth, light, height, width)
    img = np.clip(shade, 0.05, None)[:, :, None] * (ground_rgb * ground_irradiance)

    label = np.zeros((height, width), dtype=np.uint8)
    shadow = np.zeros((height, width), dtype=np.float32)

    # --- sky band -----------------------------------------------------------------------------------------------------
    if has_sky:
        sky_rows = int(math.ceil(horizon))
        t = (rows[:sky_rows] / max(horizon, 1.0))[:, None]  # 0 at the top, 1 at the horizon
        sky = (1.0 - t) * np.asarray(style.sky_top) + t * np.asarray(style.sky_horizon)
        # The sky is emitted light: undo the exposure so it keeps its palette colour in the final image.
        img[:sky_rows] = (sky[:, None, :] / exposure).astype(np.float32)
        label[:sky_rows] = 2

    # --- rocks --------------------------------------------------------------------------------------------------------
    # All rocks are sampled and rasterised at once: every rock's bounding box is enumerated into one flat "ragged"
    # pixel list, so the cost is a few dozen numpy calls per image instead of a Python loop over rocks.
    top = max(horizon, 0.0)
    ground_frac = (height - top) / height
    n_rocks = int(rng.poisson(_uniform(rng, style.rock_count) * ground_frac * width / height))
    rmin, rmax = style.rock_radius
    # Heavy tail: log-uniform sizes skewed towards pebbles, a few boulders.
    base_radius = rmin * (rmax / rmin) ** (rng.random(n_rocks) ** style.size_skew) * size
    # The far field is compressed by perspective, so it holds more rocks per image row.
    cy = top + (height - top) * rng.random(n_rocks) ** 0.8
    cx = rng.uniform(-0.05, 1.05, n_rocks) * width
    elong = rng.uniform(*style.elongation, n_rocks)
    rot = rng.uniform(0.0, np.pi, n_rocks)
    albedo = 1.0 + style.rock_albedo_jitter * rng.uniform(-1.0, 1.0, n_rocks)
    if style.angular:
        n_vert = rng.integers(4, 8, n_rocks)
        vert_r = (1.0 + style.roughness * rng.uniform(-1.0, 1.0, (n_rocks, 7))).astype(np.float32)
        vert_off = rng.uniform(0.0, 2.0 * np.pi, n_rocks).astype(np.float32)
    else:
        harm_a = (style.roughness * rng.uniform(0.0, 1.0, (n_rocks, 3)) / np.array([1.0, 2.0, 3.0])).astype(np.float32)
        harm_p = rng.uniform(0.0, 2.0 * np.pi, (n_rocks, 3)).astype(np.float32)
    facet_offset = rng.uniform(0.0, 2.0 * np.pi)
    rock_tex = None
    if style.rock_texture > 0.0:
        rock_tex = style.rock_texture * _value_noise(rng, height, width, max(2.0, size / 40.0))

    scale = np.interp(cy, rows, depth)
    radius = base_radius * scale
    squash = 0.5 + 0.45 * scale  # foreshortening: ground objects look flatter towards the horizon
    order = np.argsort(cy, kind="stable")  # painter's algorithm: far rocks first, near rocks drawn over them
    order = order[radius[order] >= 1.5]  # pebbles of ~1 px would be unlabellable noise
    # float32 geometry: half the memory traffic of float64, plenty of precision for pixel coordinates.
    cy, cx, radius, squash, elong, rot, albedo = (
        x[order].astype(np.float32) for x in (cy, cx, radius, squash, elong, rot, albedo)
    )

    # Rock pixels.
    ext = radius * elong * (1.0 + 1.5 * style.roughness) + 1.5
    ids, py, px = _ragged_boxes(cy - ext * squash, cy + ext * squash, cx - ext, cx + ext, height, width)
    v = (py.astype(np.float32) - cy[ids]) / squash[ids]  # un-foreshortened ground coords around the rock centre
    u = px.astype(np.float32) - cx[ids]
    cos_r, sin_r = np.cos(rot)[ids], np.sin(rot)[ids]
    a = (u * cos_r + v * sin_r) / elong[ids]
    b = v * cos_r - u * sin_r
    theta = np.arctan2(b, a)
    if style.angular:
        # Irregular polygon with straight edges between vertices: angular, fractured-looking rocks.
        rid = order[ids]
        n = n_vert[rid]
        step = (2.0 * np.pi / n).astype(np.float32)
        t = np.mod(theta - vert_off[rid], 2.0 * np.pi) / step
        j = np.minimum(t.astype(np.int64), n - 1)
        phi = (t - j) * step
        r0 = vert_r[rid, j]
        r1 = vert_r[rid, (j + 1) % n]
        outline = r0 * r1 * np.sin(step) / (r0 * np.sin(phi) + r1 * np.sin(step - phi))
    else:
        # Smooth blob: a circle perturbed by harmonics 2..4 (a smoothed random polygon).
        rid = order[ids]
        outline = 1.0 + sum(harm_a[rid, k] * np.cos((k + 2) * theta + harm_p[rid, k]) for k in range(3))
    rho = np.hypot(a, b) / (radius[ids] * outline)
    inside = rho < 1.0
    ids, py, px, u, v, rho = ids[inside], py[inside], px[inside], u[inside], v[inside], rho[inside]
    # Normal of a dome over the outline: tilt grows with rho; flatter rocks have a bigger vertical component.
    ang = np.arctan2(v, u)
    if style.angular:
        # Faceted shading: quantise the normal azimuth into sectors, and rho into a flat top and a steep flank.
        fstep = 2.0 * np.pi / 6.0
        ang = np.round((ang - facet_offset) / fstep) * fstep + facet_offset
        rho = np.where(rho < 0.45, 0.15, 0.8)
    nz = style.flatness * np.sqrt(np.clip(1.0 - rho * rho, 0.0, 1.0))
    nx, ny = rho * np.cos(ang), rho * np.sin(ang)
    inv_norm = 1.0 / (np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-6)
    lambert = np.clip((nx * light[0] + ny * light[1] + nz * light[2]) * inv_norm, 0.0, None)
    up = nz * inv_norm
    irr = style.ambient + style.rock_fill * up + style.bounce * (1.0 - up) + lambert
    if rock_tex is not None:
        irr = irr * (1.0 + rock_tex[py, px])
    if grain is not None:
        irr = irr * (1.0 + 0.5 * grain[py, px])
    flat = py * width + px
    # Overlapping rocks: keep the last (nearest) writer of each pixel, explicitly rather than relying on the order
    # in which numpy performs fancy assignment with repeated indices.
    _, last = np.unique(flat[::-1], return_index=True)
    last = flat.size - 1 - last
    img.reshape(-1, 3)[flat[last]] = (irr[last, None] * (rock_rgb * albedo[ids[last], None])).astype(np.float32)
    label.reshape(-1)[flat[last]] = 1
    instances = np.zeros((height, width), dtype=np.int32)
    instances.reshape(-1)[flat[last]] = ids[last] + 1
    rock_size = (base_radius[order] / size).astype(np.float32)

    # Cast shadows: each rock footprint swept along the shadow direction (a capsule in ground coordinates). Rock
    # height ~ radius / flatness, so the shadow reaches height / tan(elevation) beyond the rock centre.
    length = radius * (0.3 + 0.9 / style.flatness / max(math.tan(elevation), 0.1))
    half_w = radius * np.sqrt(elong) * 0.8
    sdx, sdy = -light[0], -light[1]
    sdn = max(math.hypot(sdx, sdy), 1e-6)
    sx, sy = sdx / sdn * length, sdy / sdn * length
    ids, py, px = _ragged_boxes(
        cy + np.minimum(0.0, sy * squash) - half_w * squash - 1.0,
        cy + np.maximum(0.0, sy * squash) + half_w * squash + 1.0,
        cx + np.minimum(0.0, sx) - half_w - 1.0,
        cx + np.maximum(0.0, sx) + half_w + 1.0,
        height,
        width,
    )
    v = (py.astype(np.float32) - cy[ids]) / squash[ids]
    u = px.astype(np.float32) - cx[ids]
    sxi, syi = sx[ids], sy[ids]
    t = np.clip((u * sxi + v * syi) / np.maximum(length[ids] ** 2, 1e-6), 0.0, 1.0)
    in_shadow = (u - t * sxi) ** 2 + (v - t * syi) ** 2 < half_w[ids] ** 2
    shadow.reshape(-1)[(py * width + px)[in_shadow]] = 1.0

    # Shadows only darken the ground (rocks carry their own shading); sky is never shadowed.
    shadow_blur = _scaled_passes(style.shadow_blur, res)
    if shadow_blur:
        shadow = _blur(shadow, shadow_blur)
    shadow *= label == 0
    # In shadow only the ambient light remains.
    keep = 1.0 - shadow * (1.0 - style.ambient / ground_irradiance)
    img *= keep[:, :, None]
    img *= exposure

    # --- atmosphere: dust veil growing towards the horizon -------------------------------------------------------------
    haze = _uniform(rng, style.haze)
    if haze > 0.0:
        veil = (haze * (1.0 - depth) ** 1.5 + 0.3 * haze)[:, None, None] * (label != 2)[:, :, None]
        img = img * (1.0 - veil) + veil * np.asarray(style.haze_color, dtype=np.float32)

    # --- sensor: blur, contrast, gamma, exposure, noise -----------------------------------------------------------------
    blur = _scaled_passes(style.blur, res)
    if blur:
        img = _blur(img, blur)
    contrast = _uniform(rng, style.contrast)
    gamma = _uniform(rng, style.gamma)
    gain = _uniform(rng, style.exposure)
    if contrast != 1.0:
        img = img.mean() + contrast * (img - img.mean())
    img = np.clip(img * gain, 0.0, None)
    if gamma != 1.0:
        img = img ** (1.0 / gamma)
    sigma = _uniform(rng, style.noise_sigma)
    if sigma > 0.0 or style.shot_noise > 0.0:
        std = sigma + style.shot_noise * np.sqrt(np.clip(img, 0.0, 1.0))
        img = img + std * rng.standard_normal(img.shape, dtype=np.float32)
    img = _soft_clip(img)
    return (img * 255.0 + 0.5).astype(np.uint8), label, instances, rock_size


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------


def _sample_seed(seed: int, domain: str, split: str, index: int) -> np.random.SeedSequence:
    """Seed sequence of sample ``index``: a stable hash of (seed, domain, split) plus the index itself.

    ``zlib.crc32`` is stable across processes and Python versions (unlike ``hash()``, which is salted per process).
    The index and the user seed go into the entropy directly rather than through the 32-bit hash, so samples of one
    stream cannot collide, and ``SeedSequence`` mixes the words so neighbouring indices give unrelated scenes.
    """
    stream = zlib.crc32(f"rocks|{domain}|{split}".encode())
    return np.random.SeedSequence([stream, int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)])


def load_rock_dataset(
    domain: str = "source",
    split: str = "train",
    num_samples: int = 200,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
) -> datasets.Dataset:
    """Render ``num_samples`` scenes of ``domain`` into an in-memory Hugging Face dataset.

    Args:
        domain: one of ``ROCK_DOMAINS``.
        split: one of ``ROCK_SPLITS`` (``"train"``, ``"validation"``, ``"test"``); splits use disjoint seed streams.
        num_samples: number of scenes (>= 1). Sample ``i`` does not depend on ``num_samples``.
        image_size: ``int`` or ``(height, width)``, each side >= 32.
        seed: global seed; any non-negative int.

    Returns:
        ``datasets.Dataset`` with columns ``image`` (RGB PIL image) and ``label`` (mode ``"L"`` PIL image of class
        ids), both ``datasets.Image()`` features, like Hugging Face semantic-segmentation datasets.
    """
    # Imported lazily: `datasets` is slow to import and the renderer alone does not need it.
    import datasets
    from PIL import Image

    size = _check_dataset_arguments(domain, split, num_samples, image_size, seed)

    images, labels = [], []
    for index in range(int(num_samples)):
        rng = np.random.default_rng(_sample_seed(seed, domain, split, index))
        image, label = render_rock_scene(domain, rng, size)
        images.append(Image.fromarray(image))
        labels.append(Image.fromarray(label))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def load_rock_datasets(
    domain: str = "source",
    num_samples: int | dict[str, int] = 200,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
    splits: tuple[str, ...] = ROCK_SPLITS,
) -> datasets.DatasetDict:
    """Build a ``datasets.DatasetDict`` with one ``load_rock_dataset`` per split.

    ``num_samples`` is either one count for every split or a ``{split: count}`` mapping.
    """
    import datasets

    out = {}
    for split in splits:
        if isinstance(num_samples, dict):
            if split not in num_samples:
                raise ValueError(
                    f"`num_samples`={num_samples!r} has no entry for split {split!r}; give a count for each of {splits}."
                )
            count = num_samples[split]
        else:
            count = num_samples
        out[split] = load_rock_dataset(domain, split, count, image_size, seed)
    return datasets.DatasetDict(out)
