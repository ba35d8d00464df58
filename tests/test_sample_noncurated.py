"""The `noncurated` sample: long tail, near-duplicates, no-class images, byte-for-byte determinism."""

from __future__ import annotations

import collections
import io
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcluster import sample_noncurated as nc
from deepcluster.data import scan_folder
from deepcluster.sample import export_sample

from .test_sample import export_fingerprint

# pinned like the other sets (tests/test_sample.py): integer draws and integer arithmetic only
NONCURATED_EXPORT_SHA256 = "57490d3f3088e1a59c0b8cd45eb7733d8c7394fe2e9587616d406a60cdae0bfa"
FOLDER_COUNTS = {
    "7": 558, "2": 396, "9": 279, "0": 189, "3": 135, "6": 99, "1": 63, "8": 36, "5": 27, "4": 18,
    "none": 200,
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("noncurated")
    assert export_sample("noncurated", out) == 2000
    return out


@pytest.fixture(scope="module")
def decoded(folder: Path) -> dict[str, np.ndarray]:
    """Every exported file's pixels as Pillow decodes them, grey (RGB files hold grey)."""
    return {
        path.relative_to(folder).as_posix(): np.asarray(Image.open(path).convert("L"))
        for path in sorted(folder.rglob("*.png"))
    }


def test_long_tailed_class_folders(folder: Path) -> None:
    counts = {entry.name: len(list(entry.iterdir())) for entry in folder.iterdir()}
    assert counts == FOLDER_COUNTS
    digits = [counts[str(d)] for d in range(10)]
    assert max(digits) >= 20 * min(digits)


def test_exact_shares_of_duplicates_and_no_class_images() -> None:
    items = nc.noncurated_items()
    kinds = collections.Counter(item.kind for item in items)
    assert len(items) == 2000
    assert kinds == {"original": 1600, "near-duplicate": 200, "noise": 80, "blank": 40,
                     "other-set": 80}  # fmt: skip
    assert {i.kind for i in items if i.path.startswith("none/")} == {"noise", "blank", "other-set"}
    for digit, count in nc.CLASS_COUNTS.items():  # one near-duplicate per 8 originals, per class
        in_folder = collections.Counter(i.kind for i in items if i.path.split("/")[0] == str(digit))
        assert in_folder == {"original": count, "near-duplicate": count // 8}


def test_pixels_as_built_and_every_image_distinct(decoded: dict[str, np.ndarray]) -> None:
    items = nc.noncurated_items()
    assert sorted(decoded) == [item.path for item in items]
    for item in items:
        np.testing.assert_array_equal(decoded[item.path], item.pixels)
    # no two images share their pixels: ingest and curate see no exact copy anywhere
    stacked = np.stack(list(decoded.values())).reshape(len(decoded), -1)
    assert len(np.unique(stacked, axis=0)) == len(decoded)


def test_near_duplicates_differ_in_bytes_but_are_close_in_pixels(
    folder: Path, decoded: dict[str, np.ndarray]
) -> None:
    pairs = nc.duplicate_pairs()
    assert len(pairs) == 200 and len({original for _, original in pairs}) == 200
    kind = {item.path: item.kind for item in nc.noncurated_items()}
    originals = [path for path, k in kind.items() if k == "original"]
    for duplicate, original in pairs:
        assert kind[original] == "original"
        assert duplicate.split("/")[0] == original.split("/")[0]  # same class folder
        assert (folder / duplicate).read_bytes() != (folder / original).read_bytes()
        dup, orig = decoded[duplicate].astype(np.int64), decoded[original]
        assert not np.array_equal(dup, orig)
        # a crop of at most one px per side, resized back, then quantisation (<= 4) and noise (<= 6)
        assert min(_crop_error(dup, orig, crop) for crop in _crops()) <= 10
        same_class = [p for p in originals if p.split("/")[0] == original.split("/")[0]]
        others = [_distance(dup, decoded[p]) for p in same_class if p != original]
        assert _distance(dup, orig) < 0.7 * np.median(others)


def _crops():
    return (c for c in itertools.product(range(nc.MAX_CROP + 1), repeat=4) if any(c))


def _crop_error(dup: np.ndarray, orig: np.ndarray, crop: tuple[int, ...]) -> int:
    top, bottom, left, right = crop
    cropped = orig[top : orig.shape[0] - bottom, left : orig.shape[1] - right]
    return int(np.abs(dup - nc.resize(cropped, *orig.shape)).max())


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b))


def test_names_do_not_tell_duplicates_apart() -> None:
    items = nc.noncurated_items()
    names = [item.path.split("/")[1] for item in items]
    pattern = re.compile(r"(IMG_|scan_|img-)?(\d{4})\.png")
    assert all(pattern.fullmatch(name) for name in names)
    assert len({pattern.fullmatch(name)[2] for name in names}) == len(names)  # numbers unique
    styles = collections.defaultdict(set)
    for item, name in zip(items, names, strict=True):
        styles[item.kind == "near-duplicate"].add(pattern.fullmatch(name)[1])
    assert styles[True] == styles[False]
    encoding = {item.path: (item.png_filter, item.rgb) for item in items}
    assert all(encoding[dup][0] != encoding[orig][0] for dup, orig in nc.duplicate_pairs())


def test_export_is_byte_identical_and_pinned(folder: Path, tmp_path: Path) -> None:
    assert export_sample("noncurated", tmp_path / "again") == 2000
    assert export_fingerprint(tmp_path / "again") == export_fingerprint(folder)
    assert export_fingerprint(folder) == NONCURATED_EXPORT_SHA256
    assert export_sample("noncurated", folder) == 2000  # completing an export changes nothing
    assert export_fingerprint(folder) == NONCURATED_EXPORT_SHA256


def test_ingest_scan_accepts_every_file(folder: Path) -> None:
    scan = scan_folder(folder)
    assert scan.rejected.height == 0
    assert scan.manifest.height == 2000
    assert set(scan.manifest["label"]) == set(FOLDER_COUNTS)
    assert set(scan.manifest["mode"]) == {"L", "RGB"}
    assert set(scan.manifest["width"]) == set(scan.manifest["height"]) == {28}


@pytest.mark.parametrize("png_filter", range(5))
@pytest.mark.parametrize("channels", [1, 3])
def test_png_filters_decode_to_the_same_pixels(png_filter: int, channels: int) -> None:
    rng = np.random.default_rng(png_filter)
    shape = (9, 13) if channels == 1 else (9, 13, 3)
    pixels = rng.integers(0, 256, size=shape).astype(np.uint8)
    with Image.open(io.BytesIO(nc.encode_png_filtered(pixels, png_filter))) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)
