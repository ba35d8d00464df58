"""Ingest on a deliberately messy folder of real files: every file is accounted for, with reasons."""

from __future__ import annotations

import io
import os
import socket
import stat
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from deepcluster.data import (
    MANIFEST_SCHEMA,
    NON_UTF8_NAME,
    REJECTED_SCHEMA,
    Entry,
    IngestError,
    build_cache,
    cache_is_current,
    decode_image,
    load_cache,
    read_entry,
    read_manifest,
    require_images,
    scan_images,
)
from deepcluster.errors import UserError
from deepcluster.imagefile import ImageLimits, ImageRejected
from deepcluster.io import atomic_path, save_parquet

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)

# path -> (width, height, mode, label) of every file the scan must accept
GOOD = {
    "cats/grey.png": (10, 10, "L", "cats"),
    "cats/photo.jpg": (20, 16, "RGB", "cats"),
    "cats/red.png": (16, 12, "RGB", "cats"),
    "cats/wide.png": (40, 20, "RGB", "cats"),
    "dogs/alpha.png": (8, 8, "RGBA", "dogs"),
    "dogs/blue.JPEG": (12, 12, "RGB", "dogs"),
    "dogs/palette.gif": (9, 7, "P", "dogs"),
}
# path -> a substring the rejection reason must contain
BAD = {
    "cats/tiny.png": "image too small (1x5)",
    "dogs/empty.png": "empty file (0 bytes)",
    "dogs/red_copy.png": "duplicate of cats/red.png",
    "dogs/text.jpg": "not a decodable image: cannot identify image file",
    "dogs/truncated.png": "truncated or corrupt image data",
    "notes.txt": "unsupported file type '.txt'",
    # tool metadata: listed with the reason, a hidden folder once for all it holds
    ".DS_Store": "hidden file: a name starting with '.' marks tool metadata",
    ".dvc": "hidden folder, not searched",
    "cats/.thumb.png": "hidden file",
}
HIDDEN = (".DS_Store", ".dvc/config", "cats/.thumb.png")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def solid(colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def left_right(left: tuple, right: tuple, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    image = Image.new(mode, size, right)
    image.paste(Image.new(mode, (size[0] // 2, size[1]), left), (0, 0))
    return image


def make_messy_folder(root: Path) -> None:
    files: dict[str, bytes] = {}
    files["cats/grey.png"] = png_bytes(Image.linear_gradient("L").resize((10, 10)))
    photo = io.BytesIO()
    solid(RED, (20, 16)).save(photo, format="JPEG")
    files["cats/photo.jpg"] = photo.getvalue()
    files["cats/red.png"] = png_bytes(solid(RED, (16, 12)))
    files["cats/wide.png"] = png_bytes(left_right(RED, BLUE, (40, 20)))
    # left half fully transparent black: must come out white, not black
    files["dogs/alpha.png"] = png_bytes(left_right((0, 0, 0, 0), GREEN + (255,), (8, 8), "RGBA"))
    blue = io.BytesIO()
    solid(BLUE, (12, 12)).save(blue, format="JPEG")
    files["dogs/blue.JPEG"] = blue.getvalue()
    gif = io.BytesIO()
    left_right(RED, GREEN, (9, 7)).convert("P", palette=Image.Palette.ADAPTIVE).save(gif, "GIF")
    files["dogs/palette.gif"] = gif.getvalue()

    files["cats/tiny.png"] = png_bytes(solid(RED, (1, 5)))
    files["dogs/empty.png"] = b""
    files["dogs/red_copy.png"] = files["cats/red.png"]
    files["dogs/text.jpg"] = b"this is not a JPEG\n"
    # random pixels do not compress, so cutting the file in half cuts the pixel data
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = png_bytes(Image.fromarray(noise))
    files["dogs/truncated.png"] = whole[: len(whole) // 2]
    files["notes.txt"] = b"shot on a sunny day\n"
    for hidden in HIDDEN:
        files[hidden] = b"tool metadata"

    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    make_messy_folder(root)
    return root


@pytest.fixture(scope="module")
def scanned(messy: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return scan_images(messy)


def test_good_images_are_in_the_manifest(scanned: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    manifest, _ = scanned
    assert manifest.schema == pl.Schema(MANIFEST_SCHEMA)
    assert manifest["path"].to_list() == sorted(GOOD)
    for row in manifest.iter_rows(named=True):
        assert (row["width"], row["height"], row["mode"], row["label"]) == GOOD[row["path"]]
        assert len(row["sha256"]) == 64 and row["bytes"] > 0


def test_bad_files_are_rejected_with_specific_reasons(
    scanned: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    _, rejected = scanned
    assert rejected.schema == pl.Schema(REJECTED_SCHEMA)
    assert rejected["path"].to_list() == sorted(BAD)
    for path, reason in rejected.iter_rows():
        assert BAD[path] in reason, (path, reason)


def test_every_file_is_accounted_for_exactly_once(
    messy: Path, scanned: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    """Each file once; a hidden folder stands for everything inside it."""
    manifest, rejected = scanned
    on_disk = set()
    for path in messy.rglob("*"):
        parts = path.relative_to(messy).parts
        hidden_folder = next((i for i, part in enumerate(parts[:-1]) if part.startswith(".")), None)
        if hidden_folder is not None:
            on_disk.add("/".join(parts[: hidden_folder + 1]))
        elif path.is_file():
            on_disk.add("/".join(parts))
    listed = manifest["path"].to_list() + rejected["path"].to_list()
    assert sorted(listed) == sorted(on_disk)
    assert ".dvc" in listed and ".dvc/config" not in listed


def test_parallel_scan_and_cache_match_sequential(
    messy: Path, scanned: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    manifest, rejected = scanned
    parallel_manifest, parallel_rejected = scan_images(messy, workers=2)
    assert parallel_manifest.equals(manifest) and parallel_rejected.equals(rejected)

    build_cache(messy, manifest, 8, tmp_path / "serial.npy")
    build_cache(messy, manifest, 8, tmp_path / "parallel.npy", workers=2)
    np.testing.assert_array_equal(
        load_cache(tmp_path / "serial.npy"), load_cache(tmp_path / "parallel.npy")
    )


def test_cache_pixels(
    messy: Path, scanned: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    manifest, _ = scanned
    path = build_cache(messy, manifest, 8, tmp_path / "cache.npy")
    cache = load_cache(path)
    assert cache.shape == (manifest.height, 3, 8, 8) and cache.dtype == np.uint8
    row = {name: index for index, name in enumerate(manifest["path"])}

    grey = cache[row["cats/grey.png"]]
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    assert grey.min() < 64 and grey.max() > 192  # the gradient survives the resize

    alpha = cache[row["dogs/alpha.png"]]
    assert tuple(alpha[:, 0, 0]) == WHITE and tuple(alpha[:, 7, 7]) == GREEN

    # 40x20 -> 16x8 -> centre crop of columns 4..11: red then blue, blended only at the seam
    wide = cache[row["cats/wide.png"]]
    assert all(tuple(wide[:, y, x]) == RED for y in range(8) for x in range(3))
    assert all(tuple(wide[:, y, x]) == BLUE for y in range(8) for x in range(5, 8))

    gif = cache[row["dogs/palette.gif"]]
    assert tuple(gif[:, 3, 0]) == RED and tuple(gif[:, 3, 7]) == GREEN


def test_cache_description_detects_staleness(
    messy: Path, scanned: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    manifest, _ = scanned
    out = build_cache(messy, manifest, 8, tmp_path / "cache.npy")
    assert cache_is_current(out, manifest, 8)
    assert not cache_is_current(out, manifest, 16)
    assert not cache_is_current(out, manifest.head(3), 8)


def test_decode_stretches_16_bit_and_converts_cmyk(tmp_path: Path) -> None:
    deep = np.array([[1000, 2000], [3000, 3000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    decoded = decode_image(tmp_path / "deep.png", 2)
    assert decoded.shape == (3, 2, 2)
    assert decoded[0].tolist() == [[0, 128], [255, 255]]

    solid(RED, (4, 4)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert decode_image(tmp_path / "cmyk.jpg", 4)[0].min() > 200


def test_labels_are_null_unless_every_image_is_in_a_subfolder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(png_bytes(solid(RED, (4, 4))))
    (tmp_path / "two.png").write_bytes(png_bytes(solid(BLUE, (4, 4))))
    manifest, rejected = scan_images(tmp_path)
    assert manifest["path"].to_list() == ["a/one.png", "two.png"]
    assert manifest["label"].null_count() == 2 and rejected.height == 0


def test_missing_or_unusable_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="data folder not found"):
        scan_images(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(IngestError, match="not a directory"):
        scan_images(tmp_path / "file.png")

    manifest, rejected = scan_images(tmp_path)
    assert manifest.height == 0 and manifest.schema == pl.Schema(MANIFEST_SCHEMA)
    with pytest.raises(IngestError, match=r"1 files rejected, e.g. file.png: empty file"):
        require_images(manifest, rejected, tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    locked = tmp_path / "locked.png"
    locked.write_bytes(png_bytes(solid(RED, (4, 4))))
    locked.chmod(0)
    try:
        _, rejected = scan_images(tmp_path)
    finally:
        locked.chmod(0o600)
    assert rejected.row(0) == ("locked.png", "permission denied")


def test_tables_round_trip(scanned: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path) -> None:
    manifest, rejected = scanned
    save_parquet(tmp_path / "manifest.parquet", manifest)
    save_parquet(tmp_path / "rejected.parquet", rejected)
    assert read_manifest(tmp_path / "manifest.parquet").equals(manifest)
    assert pl.read_parquet(tmp_path / "rejected.parquet").equals(rejected)
    with pytest.raises(IngestError, match="manifest not found"):
        read_manifest(tmp_path / "missing.parquet")
    with pytest.raises(IngestError, match="image cache not found"):
        load_cache(tmp_path / "missing.npy")


def test_failed_writes_leave_nothing_behind(
    messy: Path, scanned: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    target = tmp_path / "out" / "artifact.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert list(target.parent.iterdir()) == []

    # an image that vanished after the scan: the cache build fails and leaves no cache
    manifest, _ = scanned
    moved = messy / "cats" / "red.png"
    moved.rename(tmp_path / "red.png")
    try:
        with pytest.raises(IngestError, match="cannot decode"):
            build_cache(messy, manifest, 8, tmp_path / "cache" / "images.npy")
    finally:
        (tmp_path / "red.png").rename(moved)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_non_utf8_file_name_is_rejected_and_the_scan_goes_on(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png_bytes(solid(RED, (4, 4))))
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"), "wb") as handle:
        handle.write(png_bytes(solid(BLUE, (4, 4))))
    manifest, rejected = scan_images(tmp_path)
    assert manifest["path"].to_list() == ["ok.png"]
    assert rejected.rows() == [("caf\\xe9.png", NON_UTF8_NAME)]
    assert NON_UTF8_NAME == "file or folder name is not valid UTF-8 (rename it to ingest it)"
    save_parquet(tmp_path / "rejected.parquet", rejected)  # parquet takes the shown name


def test_symlinks_out_of_the_folder_are_refused_unless_allowed(tmp_path: Path) -> None:
    outside, data = tmp_path / "outside", tmp_path / "data"
    outside.mkdir(), data.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(solid(RED, (4, 4))))
    (data / "own.png").write_bytes(png_bytes(solid(BLUE, (4, 4))))
    (data / "escape.png").symlink_to(outside / "secret.png")
    manifest, rejected = scan_images(data)
    assert manifest["path"].to_list() == ["own.png"]
    assert rejected.row(0)[0] == "escape.png" and "outside the data folder" in rejected.row(0)[1]

    manifest, rejected = scan_images(data, follow_external_links=True)
    assert manifest["path"].to_list() == ["escape.png", "own.png"] and rejected.height == 0


def test_exif_orientation_is_applied_when_decoding(tmp_path: Path) -> None:
    """Stored red above blue; orientation 6 (turn 90 degrees clockwise) shows blue left, red right."""
    image = Image.new("RGB", (16, 16), BLUE)
    image.paste(Image.new("RGB", (16, 8), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    decoded = decode_image(tmp_path / "turned.jpg", 8).astype(int)
    assert decoded[2, 4, 0] > 200 and decoded[0, 4, 0] < 60  # left column: blue
    assert decoded[0, 4, 7] > 200 and decoded[2, 4, 7] < 60  # right column: red


def test_decoding_refuses_extreme_sizes_from_the_header(tmp_path: Path) -> None:
    """A 6 KB PNG of 2 x 2,000,000 px once took 1.6 GB and 39 s; now it is refused unread."""
    from benchmarks.bad_files import png, zeros_stream

    (tmp_path / "needle.png").write_bytes(png(2, 2_000_000, zeros_stream(2, 2_000_000)))
    with pytest.raises(ImageRejected, match=r"extreme aspect ratio \(2x2000000; limit 100:1"):
        decode_image(tmp_path / "needle.png", 16)
    (tmp_path / "wide.png").write_bytes(png_bytes(solid(RED, (300, 10))))
    with pytest.raises(ImageRejected, match="too many pixels"):
        decode_image(tmp_path / "wide.png", 8, ImageLimits(max_pixels=2_000))
    assert decode_image(tmp_path / "wide.png", 8, ImageLimits(max_aspect=30)).shape == (3, 8, 8)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCLUSTER_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("DEEPCLUSTER_MAX_IMAGE_ASPECT", "4.5")
    assert ImageLimits.from_env() == ImageLimits(max_pixels=1000, max_aspect=4.5)
    monkeypatch.setenv("DEEPCLUSTER_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(UserError, match="DEEPCLUSTER_MAX_IMAGE_BYTES='lots': give a positive int"):
        ImageLimits.from_env()


def plant_special_entries(folder: Path) -> dict[str, str]:
    """Real FIFOs, a socket, links and folders that are not images, among good images; returns
    path -> the reason each must be rejected with. A device node only where mknod is allowed."""
    for label, colour in (("a", RED), ("b", BLUE)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / "good.png").write_bytes(png_bytes(solid(colour, (6, 6))))
    os.mkfifo(folder / "a" / "pipe.png")
    server = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(folder / "a")  # a short relative name: socket paths are limited to ~100 bytes
    try:
        server.bind("socket.png")
    finally:
        os.chdir(cwd)
        server.close()  # the socket file stays
    (folder / "a" / "zero.png").symlink_to("/dev/zero")
    (folder / "a" / "loop.png").symlink_to("loop.png")
    (folder / "b" / "dangling.png").symlink_to("missing.png")
    (folder / ".hidden.png").write_bytes(png_bytes(solid(GREEN, (6, 6))))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.png").write_bytes(png_bytes(solid(WHITE, (6, 6))))
    (folder / "empty").mkdir()
    (folder / "dir.png").mkdir()
    expected = {
        "a/pipe.png": "not a regular file (a named pipe (FIFO))",
        "a/socket.png": "not a regular file (a socket)",
        "a/zero.png": "symbolic link to outside the data folder",
        "a/loop.png": "symbolic link loop",
        "b/dangling.png": "broken symbolic link",
        ".hidden.png": "hidden file",
        ".cache": "hidden folder, not searched",
        "empty": "empty folder",
        "dir.png": "empty folder (a folder named like an image file)",
    }
    try:
        os.mknod(folder / "b" / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["b/null.png"] = "not a regular file (a character device)"
    except PermissionError:
        pass  # no CAP_MKNOD here: the /dev/zero link covers devices
    return expected


def test_special_entries_are_rejected_each_with_its_reason(tmp_path: Path) -> None:
    expected = plant_special_entries(tmp_path)
    manifest, rejected = scan_images(tmp_path)
    assert manifest["path"].to_list() == ["a/good.png", "b/good.png"]
    assert rejected["path"].to_list() == sorted(expected)
    for path, reason in rejected.iter_rows():
        assert reason.startswith(expected[path]), (path, reason)

    # followed on request, a link to a device is still refused by its type, nothing read from it
    _, rejected = scan_images(tmp_path, follow_external_links=True)
    reasons = dict(rejected.iter_rows())
    assert reasons["a/zero.png"] == "not a regular file (a character device)"


def test_a_folder_named_like_an_image_is_searched(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.png" / "inside.png").write_bytes(png_bytes(solid(RED, (4, 4))))
    manifest, rejected = scan_images(tmp_path)
    assert manifest["path"].to_list() == ["dir.png/inside.png"] and rejected.height == 0


def test_an_entry_is_opened_without_following_any_link_in_its_path(tmp_path: Path) -> None:
    """What the scan checked can be swapped before the file is read: a folder replaced by a link
    out of the data folder is refused at the open, not followed."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "a").mkdir(parents=True)
    outside.mkdir()
    (data / "a" / "x.png").write_bytes(png_bytes(solid(RED, (4, 4))))
    (outside / "x.png").write_bytes(png_bytes(solid(BLUE, (4, 4))))
    entry = Entry(os.path.realpath(data), "a/x.png", False, ImageLimits())
    assert read_entry(entry) == (data / "a" / "x.png").read_bytes()

    (data / "a").rename(data / "moved")
    (data / "a").symlink_to(outside)  # the swap
    with pytest.raises(ImageRejected, match="symbolic link loop|not a folder"):
        read_entry(entry)
    os.mkfifo(data / "moved" / "late.png")  # a FIFO where a file was: refused, never blocks
    with pytest.raises(ImageRejected, match=r"not a regular file \(a named pipe"):
        read_entry(entry._replace(path="moved/late.png"))
