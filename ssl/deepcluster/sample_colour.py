"""Colour sample sets made from MNIST-5k, to measure whether clusters follow content or colour:
`colour-nuisance` (a random colour per digit: colour says nothing about the class) and
`colour-coded` (digits 0-4 in a warm or a cool stroke: colour is half the label). Only integer
draws and IEEE +, -, *, / make the pixels, so the export is byte-identical on every machine."""

from __future__ import annotations

import numpy as np

SEED = 20261202
NUISANCE_PER_CLASS = 300
CODED_DIGITS = 5  # shapes 0..4
CODED_PER_CLASS = 250  # per (shape, colour family): 500 MNIST-5k digits per shape, split in two
MIN_CONTRAST = 80  # luma difference between stroke and background, 0..255: the digit stays legible
NOISE = 16  # +- uniform integer noise per pixel and channel
FAMILIES = {"warm": (-40, 60), "cool": (150, 250)}  # stroke hue ranges in degrees


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of integer colours (..., 3), in 0..255."""
    return (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000


def _redraw_until(rng: np.random.Generator, draw, ok) -> np.ndarray:
    """`draw(n)` rows; rows failing `ok` are drawn again until every row passes."""
    rows = draw(None)
    bad = ~ok(rows)
    while bad.any():
        rows[bad] = draw(int(bad.sum()))
        bad = ~ok(rows)
    return rows


def _gradient(rng: np.random.Generator, n: int, side: int) -> np.ndarray:
    """(n, side, side) ramps from 0 to 1 along a random direction per image."""
    d = rng.integers(-8, 9, size=(n, 2))
    d[(d == 0).all(axis=1), 0] = 1
    centre = (side - 1) / 2
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) - np.float32(centre)
    dx, dy = (d[:, :1, None].astype(np.float32), d[:, 1:, None].astype(np.float32))
    t = (xx * dx + yy * dy) / (np.float32(centre) * (np.abs(dx) + np.abs(dy)))
    return (t + 1) / 2


def _compose(rng, digits: np.ndarray, stroke: np.ndarray, bg0: np.ndarray, bg1: np.ndarray):
    """Stroke colour where the digit is, a gradient between two colours elsewhere, noise."""
    n, side, _ = digits.shape
    mask = (digits.astype(np.float32) / 255)[..., None]
    t = _gradient(rng, n, side)[..., None]
    bg = bg0[:, None, None, :] + t * (bg1 - bg0)[:, None, None, :]
    image = mask * stroke[:, None, None, :] + (1 - mask) * bg
    image += rng.integers(-NOISE, NOISE + 1, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _contrasting_background(rng, stroke: np.ndarray, grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two background colours per image (the gradient's ends), each far from the stroke in luma."""
    n = len(stroke)
    lum = _luma(stroke.astype(np.float32))

    def draw(count):
        m = n if count is None else count
        if grey:
            return np.repeat(rng.integers(0, 256, size=(m, 1)), 3, axis=1).astype(np.float32)
        return rng.integers(0, 256, size=(m, 3)).astype(np.float32)

    def ok(rows):
        return np.abs(_luma(rows) - lum) >= MIN_CONTRAST

    return _redraw_until(rng, draw, ok), _redraw_until(rng, draw, ok)


def _hue_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """HSV -> RGB in 0..255 for hue in degrees, piecewise linear (no trigonometry)."""
    h = (hue % 360) / 60
    c = val * sat
    x = c * (1 - np.abs(h % 2 - 1))
    zero = np.zeros_like(c)
    sector = np.floor(h).astype(int) % 6
    table = [(c, x, zero), (x, c, zero), (zero, c, x), (zero, x, c), (x, zero, c), (c, zero, x)]
    rgb = np.zeros((len(h), 3), dtype=np.float32)
    for s, channels in enumerate(table):
        rows = sector == s
        rgb[rows] = np.stack([ch[rows] for ch in channels], axis=1)
    return (rgb + (val - c)[:, None]) * 255


def colour_nuisance(pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28, 3) images and their digit labels: colours drawn independently of the class."""
    rng = np.random.default_rng(SEED)
    chosen = np.concatenate(
        [np.flatnonzero(labels == d)[:NUISANCE_PER_CLASS] for d in range(10)]
    )
    n = len(chosen)
    stroke = rng.integers(0, 256, size=(n, 3)).astype(np.float32)
    bg0, bg1 = _contrasting_background(rng, stroke, grey=False)
    return _compose(rng, pixels[chosen], stroke, bg0, bg1), labels[chosen]


def colour_coded(pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28, 3) images and labels like `3-warm`: shape and stroke colour make the class."""
    rng = np.random.default_rng(SEED + 1)
    chosen, names = [], []
    for d in range(CODED_DIGITS):
        rows = np.flatnonzero(labels == d)[: 2 * CODED_PER_CLASS]
        for i, family in enumerate(FAMILIES):
            chosen.append(rows[i::2])
            names += [f"{d}-{family}"] * len(rows[i::2])
    chosen = np.concatenate(chosen)
    names = np.array(names)
    n = len(chosen)
    lo = np.array([FAMILIES[name.split("-")[1]][0] for name in names], dtype=np.float32)
    hi = np.array([FAMILIES[name.split("-")[1]][1] for name in names], dtype=np.float32)
    u = rng.integers(0, 1001, size=(n, 3)).astype(np.float32) / 1000
    stroke = _hue_to_rgb(lo + u[:, 0] * (hi - lo), 0.6 + 0.4 * u[:, 1], 0.6 + 0.4 * u[:, 2])
    bg0, bg1 = _contrasting_background(rng, stroke, grey=True)
    return _compose(rng, pixels[chosen], stroke, bg0, bg1), names
