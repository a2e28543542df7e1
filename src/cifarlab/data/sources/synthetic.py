"""`synthetic[:N]`: generated, learnable stripe and shape images in ten classes, made
deterministically in memory (never cached)."""

from __future__ import annotations

import numpy as np

from cifarlab.data.sources.images import SIZE, ImageSet, SourceData
from cifarlab.errors import UserError

SYNTHETIC_TRAIN = 2000
SYNTHETIC_CLASSES = [
    "hstripes_wide", "hstripes_narrow", "vstripes_wide", "vstripes_narrow", "grid",
    "crosshatch", "rings", "spokes", "disk", "circle",
]


def _synthetic(spec: str) -> SourceData:
    """`synthetic[:N]`: N training images (default 2000) and max(N // 5, 100) test images.

    Ten balanced classes of 32x32 patterns that a small CNN learns in a few epochs and that
    survive flips, small rotations, crops, colour jitter and erasing: horizontal / vertical
    stripes at two frequencies, an axis-aligned grid, a diagonal cross-hatch, concentric
    rings, radial spokes, a filled disk and a circle outline. Every class is symmetric under
    a horizontal flip, and colours are random per image (two random colours of different
    brightness, either one in front), so only the structure tells the classes apart.
    Per image: random phase, centre, frequency (+-10 %), size, colours and pixel noise.
    Deterministic: train uses seed 0, test seed 1.
    """
    _, colon, count = spec.partition(":")
    if colon:
        try:
            n = int(count.strip())
        except ValueError:
            n = -1
        if not 10 <= n <= 1_000_000:
            raise UserError(f"--data {spec}: N must be a whole number from 10 to 1000000 "
                            "(e.g. synthetic:2000)")
    else:
        n = SYNTHETIC_TRAIN
    train = ImageSet(*_synthetic_images(n, seed=0), list(SYNTHETIC_CLASSES))
    test = ImageSet(*_synthetic_images(max(n // 5, 100), seed=1), list(SYNTHETIC_CLASSES))
    return SourceData(train, test)


def _synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([0xC1FA, seed])
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    p = np.empty((n, SIZE, SIZE), np.float32)
    for c in range(10):
        sel = np.flatnonzero(labels == c)
        k = len(sel)

        def draw(low: float, high: float, k: int = k) -> np.ndarray:
            return rng.uniform(low, high, (k, 1, 1)).astype(np.float32)

        x, y = xx - draw(10, 22), yy - draw(10, 22)  # centred for rings, spokes and shapes
        phase, f = draw(0, 2 * np.pi), draw(0.9, 1.1) * (2 * np.pi / SIZE)  # f: one cycle
        p[sel] = _PATTERNS[c](x, y, phase, f, draw(6, 10))
    # Two colours: random hue, clearly different brightness, either one in front.
    dark = rng.uniform(20, 110, (n, 1)) + rng.uniform(-30, 30, (n, 3))
    light = dark + rng.uniform(90, 140, (n, 1)) + rng.uniform(-30, 30, (n, 3))
    swap = rng.random(n) < 0.5
    fg = np.where(swap[:, None], dark, light).astype(np.float32)[:, None, None, :]
    bg = np.where(swap[:, None], light, dark).astype(np.float32)[:, None, None, :]
    img = bg + (fg - bg) * p[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 8
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def _wave(t: np.ndarray) -> np.ndarray:  # a sine mapped to [0, 1]
    return 0.5 + 0.5 * np.sin(t)


def _radius(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y)


# One per class of SYNTHETIC_CLASSES: (x, y, phase, f = one cycle per image, size) -> [0, 1].
_PATTERNS = [
    lambda x, y, ph, f, s: _wave(3 * f * y + ph),
    lambda x, y, ph, f, s: _wave(6 * f * y + ph),
    lambda x, y, ph, f, s: _wave(3 * f * x + ph),
    lambda x, y, ph, f, s: _wave(6 * f * x + ph),
    lambda x, y, ph, f, s: 0.5 * (_wave(4 * f * x + ph) + _wave(4 * f * y + 2 * ph)),
    lambda x, y, ph, f, s: 0.5 * (_wave(2.8 * f * (x + y) + ph) + _wave(2.8 * f * (x - y) - ph)),
    lambda x, y, ph, f, s: _wave(4 * f * _radius(x, y) + ph),
    lambda x, y, ph, f, s: _wave(6 * np.arctan2(y, x) + ph),
    lambda x, y, ph, f, s: np.clip(s - _radius(x, y) + 0.5, 0, 1),  # filled disk, soft edge
    lambda x, y, ph, f, s: np.clip(1.5 - np.abs(_radius(x, y) - s), 0, 1),  # ring ~3 px wide
]
