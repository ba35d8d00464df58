"""`noncurated`: a deterministic folder that looks like a real, messy, non-curated image folder:
MNIST-5k digits in a long tail, near-duplicates in their original's folder (`duplicate_pairs`)
and images of no class in `none/`. Only integer draws and integer arithmetic make the pixels and
the PNG bytes, so the export is byte-identical on every machine."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data
from .sample import (
    DIGITS_MAX_VALUE,
    MNIST_SIDE,
    PNG_SIGNATURE,
    _chunk,
    _refuse_foreign_entries,
    _write_if_changed,
    _zlib_stored,
    load_mnist5k,
)

SEED = 20261215
# originals per digit, roughly geometric (ratio ~0.7) from 496 down to 16; each a multiple of
# ORIGINALS_PER_DUPLICATE so every class gets exactly one near-duplicate per 8 originals and the
# folder counts keep the 31:1 ratio. Confusable pairs sit at opposite ends (9 vs 4, 3 vs 5).
CLASS_COUNTS = {7: 496, 2: 352, 9: 248, 0: 168, 3: 120, 6: 88, 1: 56, 8: 32, 5: 24, 4: 16}
ORIGINALS_PER_DUPLICATE = 8  # 1,600 originals -> 200 duplicates: 10% of 2,000
NO_CLASS = data.NO_CLASS  # folder of the images that belong to no digit class
NO_CLASS_COUNTS = {"noise": 80, "blank": 40, "other-set": 80}  # 200: 10% of 2,000
NAME_STYLES = ("IMG_{:04d}.png", "scan_{:04d}.png", "img-{:04d}.png", "{:04d}.png")
NAME_NUMBERS = 10_000  # file numbers are drawn from 0..9999: gaps, like a real folder
PNG_FILTERS = 5  # none, sub, up, average, paeth
RGB_ONE_IN = 5  # about one file in five is saved as RGB (grey in three channels)
# near-duplicates lose 0..1 px per side (at least one in all): one px is 3.6% of a 28 px side;
# with 2 px, a third of the copies were nearer some other digit than their original (pixel L2)
MAX_CROP = 1
MAX_SHIFT = 3  # re-quantisation: keep the top 8 - shift bits, shift in 0..3
MAX_NOISE = 6  # +- uniform integer noise on near-duplicates
NOISE_AMPLITUDE = (16, 128)  # noise images: +- amplitude around a random mean


@dataclass(frozen=True, eq=False)  # eq would compare (and hash) pixel arrays
class Item:
    """One file of the export: where it goes, its pixels, what it is and how it is encoded."""

    path: str  # relative POSIX path, `<folder>/<name>`
    pixels: np.ndarray  # (28, 28) uint8 grey
    kind: str  # "original", "near-duplicate", "noise", "blank" or "other-set"
    source: str  # "mnist5k:<i>", the original's path (near-duplicates), "digits:<i>", or ""
    png_filter: int  # PNG filter type of every scanline, 0..4
    rgb: bool  # saved as RGB rather than grey


def export_noncurated(out_dir: Path) -> int:
    """Write the set under `out_dir` (as `deepcluster.sample.export_images` does: completes an
    earlier export, refuses a folder holding anything else); return the number of files."""
    out_dir = Path(out_dir)
    files = {item.path: item for item in noncurated_items()}
    _refuse_foreign_entries(out_dir, set(files))
    for relative, item in files.items():
        _write_if_changed(out_dir / relative, encode_item(item))
    return len(files)


def encode_item(item: Item) -> bytes:
    pixels = np.repeat(item.pixels[..., None], 3, axis=2) if item.rgb else item.pixels
    return encode_png_filtered(pixels, item.png_filter)


def duplicate_pairs() -> list[tuple[str, str]]:
    """(near-duplicate, its original) relative paths, sorted."""
    return sorted((i.path, i.source) for i in noncurated_items() if i.kind == "near-duplicate")


@functools.cache
def noncurated_items() -> tuple[Item, ...]:
    """Every file of the set, sorted by path (cached: building it reads MNIST-5k, ~2 s)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return build_items(*load_mnist5k(), digits.images.astype(np.int64))


def build_items(
    mnist: np.ndarray, mnist_labels: np.ndarray, digits: np.ndarray
) -> tuple[Item, ...]:
    """The set from MNIST-5k and scikit-learn's digits (0..16); the draws happen in a fixed order
    from one seeded generator, so any change here changes the pinned fingerprint."""
    rng = np.random.default_rng(SEED)
    originals = _originals(rng, mnist, mnist_labels)
    drafts = originals + _near_duplicates(rng, originals) + _no_class(rng, digits)
    names = _names(rng, len(drafts))
    paths = [f"{folder}/{name}" for (folder, *_), name in zip(drafts, names, strict=True)]
    filters = rng.integers(0, PNG_FILTERS, size=len(drafts))
    rgb = rng.integers(0, RGB_ONE_IN, size=len(drafts)) == 0
    items = []
    for i, (_, pixels, kind, source) in enumerate(drafts):
        if kind == "near-duplicate":  # source: the original's index (originals come first)
            # re-encoded: never with the filter its original was written with
            filters[i] = (filters[source] + 1 + filters[i] % 4) % PNG_FILTERS
            source = paths[source]
        items.append(Item(paths[i], pixels, kind, source, int(filters[i]), bool(rgb[i])))
    return tuple(sorted(items, key=lambda item: item.path))


def _shuffled(rng: np.random.Generator, n: int) -> np.ndarray:
    """A permutation of range(n) from integer draws only (ties broken by position)."""
    return np.argsort(rng.integers(0, 2**62, size=n), kind="stable")


def _originals(rng: np.random.Generator, mnist: np.ndarray, labels: np.ndarray) -> list[tuple]:
    drafts = []
    for digit, count in CLASS_COUNTS.items():
        rows = np.flatnonzero(labels == digit)
        for row in np.sort(rows[_shuffled(rng, len(rows))[:count]]):
            drafts.append((str(digit), mnist[row], "original", f"mnist5k:{row}"))
    return drafts


def _near_duplicates(rng: np.random.Generator, originals: list[tuple]) -> list[tuple]:
    """One near-duplicate per ORIGINALS_PER_DUPLICATE originals of each class, each of a
    different original, which its source field gives as an index into `originals`."""
    drafts = []
    for digit in CLASS_COUNTS:
        members = [i for i, draft in enumerate(originals) if draft[0] == str(digit)]
        chosen = _shuffled(rng, len(members))[: len(members) // ORIGINALS_PER_DUPLICATE]
        for index in np.sort(np.asarray(members)[chosen]):
            folder, pixels = originals[index][:2]
            drafts.append((folder, near_duplicate(rng, pixels), "near-duplicate", int(index)))
    return drafts


def near_duplicate(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """A slightly cropped (resized back), re-quantised and noised copy of a grey image."""
    crop = rng.integers(0, MAX_CROP + 1, size=4)  # top, bottom, left, right
    if crop.sum() == 0:
        crop[rng.integers(0, 4)] = 1
    height, width = pixels.shape
    cropped = pixels[crop[0] : height - crop[1], crop[2] : width - crop[3]]
    image = resize(cropped, height, width)
    shift = int(rng.integers(0, MAX_SHIFT + 1))
    image = ((image >> shift) << shift) + ((1 << shift) >> 1)  # to the middle of each level
    image = image + rng.integers(-MAX_NOISE, MAX_NOISE + 1, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with corners aligned, in integer arithmetic (rounded): int64 (h, w)."""
    ys, fy, dy = _taps(image.shape[0], height)
    xs, fx, dx = _taps(image.shape[1], width)
    src = image.astype(np.int64)
    top = src[ys][:, xs] * (dx - fx) + src[ys][:, xs + 1] * fx
    bottom = src[ys + 1][:, xs] * (dx - fx) + src[ys + 1][:, xs + 1] * fx
    rows = (dy - fy)[:, None] * top + fy[:, None] * bottom
    scale = dy * dx
    return (rows + scale // 2) // scale


def _taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output position: the source index i and the weight numerator of i + 1, then their
    common denominator; the last position takes i + 1 whole, so i + 1 stays inside the source."""
    den = max(size_out - 1, 1)
    num = np.arange(size_out) * (size_in - 1)
    index, frac = num // den, num % den
    last = index >= size_in - 1  # the last output lands exactly on the last source pixel
    index[last], frac[last] = size_in - 2, den
    return index, frac, den


def _no_class(rng: np.random.Generator, digits: np.ndarray) -> list[tuple]:
    counts = NO_CLASS_COUNTS
    drafts = [(NO_CLASS, image, "noise", "") for image in _noise(rng, counts["noise"])]
    drafts += [(NO_CLASS, image, "blank", "") for image in _blank(rng, counts["blank"])]
    rows = np.sort(_shuffled(rng, len(digits))[: counts["other-set"]])
    # 0..16 -> 0..255 rounded, then 8 px -> 28 px
    for row in rows:
        grey = (digits[row] * 255 + DIGITS_MAX_VALUE // 2) // DIGITS_MAX_VALUE
        image = resize(grey, MNIST_SIDE, MNIST_SIDE).astype(np.uint8)
        drafts.append((NO_CLASS, image, "other-set", f"digits:{row}"))
    return drafts


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    shape = (n, MNIST_SIDE, MNIST_SIDE)
    mean = rng.integers(0, 256, size=(n, 1, 1))
    amplitude = rng.integers(NOISE_AMPLITUDE[0], NOISE_AMPLITUDE[1] + 1, size=(n, 1, 1))
    offsets = rng.integers(-(2**16), 2**16 + 1, size=shape)
    return np.clip(mean + offsets * amplitude // 2**16, 0, 255).astype(np.uint8)


def _blank(rng: np.random.Generator, n: int) -> np.ndarray:
    # distinct levels: two equal flat files would be exact copies, which ingest rejects
    levels = _shuffled(rng, 256)[:n]
    return np.broadcast_to(levels[:, None, None], (n, MNIST_SIDE, MNIST_SIDE)).astype(np.uint8)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """Unique numbers in mixed name styles, drawn independently of what each file is."""
    numbers = _shuffled(rng, NAME_NUMBERS)[:n]
    styles = rng.integers(0, len(NAME_STYLES), size=n)
    return [NAME_STYLES[s].format(number) for s, number in zip(styles, numbers, strict=True)]


def encode_png_filtered(pixels: np.ndarray, png_filter: int) -> bytes:
    """`deepcluster.sample.encode_png` with one PNG filter type (0..4) for every scanline."""
    rgb = pixels.ndim == 3 and pixels.shape[2] == 3
    if not (pixels.ndim == 2 or rgb) or pixels.dtype != np.uint8:
        raise ValueError(f"expected (h, w) or (h, w, 3) uint8, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    rows = filter_scanlines(pixels.reshape(height, -1), png_filter, 3 if rgb else 1)
    scanlines = b"".join(bytes([png_filter]) + row.tobytes() for row in rows)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _zlib_stored(scanlines))
        + _chunk(b"IEND", b"")
    )


def filter_scanlines(raw: np.ndarray, png_filter: int, bpp: int) -> np.ndarray:
    """(h, bytes per row) uint8 -> the same rows filtered as PNG specifies (predictors read the
    unfiltered bytes: a left, b above, c above-left; zero outside the image)."""
    x = raw.astype(np.int64)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    a[:, bpp:], b[1:], c[1:, bpp:] = x[:, :-bpp], x[:-1], x[:-1, :-bpp]
    if png_filter == 4:
        predictor = _paeth(a, b, c)
    else:
        predictor = (np.zeros_like(x), a, b, (a + b) // 2)[png_filter]
    return ((x - predictor) % 256).astype(np.uint8)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
