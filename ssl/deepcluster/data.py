"""Ingest a folder of images: validate every file once, then decode once into a memory-mapped cache.
`scan_folder` puts every entry in exactly one table, the manifest or `rejected` (with its reason);
`build_cache` decodes the manifest to uint8 RGB at the training resolution. Workers are spawned
processes: a script calling these must guard its entry point with `if __name__ == "__main__":`."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, Any, NamedTuple

import numpy as np
import polars as pl

from deepcluster.errors import UserError
from deepcluster.imagefile import (
    MIN_SIDE,  # noqa: F401 -- re-exported: the manifest checks import it from here
    ImageLimits,
    ImageRejected,
    decode_bytes,
    file_kind,
    load_first_frame,
    open_checked,
    os_reason,
    read_inside,
    read_regular_file,
)
from deepcluster.io import atomic_path, write_json
from deepcluster.paths import cache_description
from deepcluster.progress import bar

NO_CLASS = "none"  # a top folder of images that belong to no class (noise, blanks, other sets)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

MANIFEST_SCHEMA = {
    "path": pl.Utf8,  # relative POSIX path under the data folder
    "sha256": pl.Utf8,  # hex digest of the file's bytes
    "md5": pl.Utf8,  # the same bytes' md5, as DVC hashes files (the data version needs no re-read)
    "bytes": pl.Int64,
    "width": pl.Int32,  # as stored (before the EXIF orientation is applied)
    "height": pl.Int32,
    "mode": pl.Utf8,  # PIL mode as stored in the file: "L", "RGB", "RGBA", "P", ...
    "label": pl.Utf8,  # first-level folder name when the layout is class-per-folder, else null
}
REJECTED_SCHEMA = {"path": pl.Utf8, "reason": pl.Utf8}


class IngestError(UserError, ValueError):
    """The data folder or an ingest artifact cannot be used; the message says which and why."""


class ImageInfo(NamedTuple):
    sha256: str
    md5: str
    size: int
    width: int
    height: int
    mode: str


class Rejection(NamedTuple):
    reason: str
    md5: str | None = None  # of the file's bytes, when the scan read them before refusing it


class Scan(NamedTuple):
    """What a scan saw: the two tables, and what the data version needs without a second read."""

    manifest: pl.DataFrame
    rejected: pl.DataFrame
    md5: dict[str, str]  # path -> md5 of every file whose bytes the scan read (rejected ones too)
    unread: tuple[str, ...]  # rejected entries with content the scan did not read


class Entry(NamedTuple):
    """One entry of the data folder, as a (possibly spawned) worker opens it."""

    root: str  # the data folder, symbolic links resolved
    path: str  # relative POSIX path under root
    follow_external_links: bool
    limits: ImageLimits


class _Listing(NamedTuple):
    files: list[str]  # entries to open: files, special files, links
    rejected: list[tuple[str, str]]  # entries the walk itself refuses, with the reason
    unread: list[str]  # those of them that hold content (all but empty folders)


# ---------------------------------------------------------------------------------------------
# Scan: folder -> (manifest, rejected)


def scan_images(
    root: Path,
    workers: int = 0,
    follow_external_links: bool = False,
    limits: ImageLimits | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`(manifest, rejected)` of `scan_folder`."""
    scan = scan_folder(root, workers, follow_external_links, limits)
    return scan.manifest, scan.rejected


def scan_folder(
    root: Path | str,
    workers: int = 0,
    follow_external_links: bool = False,
    limits: ImageLimits | None = None,
) -> Scan:
    """Validate every entry under `root`: the manifest lists the usable images, `rejected` every
    other entry with its reason, both sorted by path.

    The walk is recursive and sorted. Each entry is looked at without being followed (lstat): only
    a regular file with an image extension is opened (non-blocking, without following links) and
    read within `limits` (default: `ImageLimits.from_env()`), then fully decoded (first frame for
    animations), so truncated files are rejected here rather than crashing training. A symbolic
    link is followed only to a regular file inside `root` (anywhere with
    `follow_external_links`); linked folders are never walked (they could loop). Hidden names
    ('.' first: tool metadata such as `.DS_Store` or `.git`) are rejected, hidden folders not
    searched; empty folders, FIFOs, sockets, devices, link loops and dangling links are rejected
    too, each with its reason. A file whose bytes equal an earlier accepted file's (in path order)
    is rejected as a duplicate. Labels are filled only when every accepted image sits in a
    first-level subfolder. An empty manifest is returned as is; see `require_images`.
    """
    root = data_folder(root)
    limits = limits or ImageLimits.from_env()
    listing = _list_entries(root)
    real_root = os.path.realpath(root)
    tasks = [Entry(real_root, path, follow_external_links, limits) for path in listing.files]
    results = _map_in_order(_inspect_file, tasks, workers, "scan")

    rejected, unread = list(listing.rejected), list(listing.unread)
    accepted: list[tuple[str, ImageInfo]] = []
    md5: dict[str, str] = {}
    first_path_by_hash: dict[str, str] = {}
    for path, result in zip(listing.files, results, strict=True):
        if result.md5 is not None:
            md5[path] = result.md5
        if isinstance(result, Rejection):
            rejected.append((path, result.reason))
            if result.md5 is None:
                unread.append(path)
        elif result.sha256 in first_path_by_hash:
            rejected.append((path, f"duplicate of {first_path_by_hash[result.sha256]}"))
        else:
            first_path_by_hash[result.sha256] = path
            accepted.append((path, result))
    return Scan(_manifest_frame(accepted), _rejected_frame(rejected), md5, tuple(sorted(unread)))


NON_UTF8_NAME = "file or folder name is not valid UTF-8 (rename it to ingest it)"
HIDDEN_FILE = "hidden file: a name starting with '.' marks tool metadata, not data"
HIDDEN_FOLDER = "hidden folder, not searched: a name starting with '.' marks tool metadata"


def _utf8(name: str) -> bool:
    """False for names os.walk could only decode with surrogate escapes (not valid UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """A name as valid text: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def require_images(
    manifest: pl.DataFrame, rejected: pl.DataFrame, root: Path | None = None
) -> None:
    """Raise IngestError when the scan found no usable image, quoting one rejection as a hint."""
    if manifest.height > 0:
        return
    where = str(root) if root is not None else "the data folder"
    if rejected.height == 0:
        raise IngestError(f"no usable images in {where}: it holds no files")
    example = rejected.row(0, named=True)
    raise IngestError(
        f"no usable images in {where}: {rejected.height} files rejected, "
        f"e.g. {example['path']}: {example['reason']}"
    )


def data_folder(root: Path | str) -> Path:
    """The image folder to scan, refused with one line unless it is an existing folder.

    An empty path is an error, not the current folder (which `Path("")` would silently be)."""
    if not os.fspath(root).strip():
        raise IngestError("data folder: the path is empty (name the image folder to ingest)")
    root = Path(root)
    if not root.exists():
        raise IngestError(f"data folder not found: {root}")
    if not root.is_dir():
        raise IngestError(f"data folder is not a directory: {root}")
    return root


def _list_entries(root: Path) -> _Listing:
    """Every entry under `root`, sorted. Hidden names, names that are not UTF-8, empty folders
    and folders that cannot be listed are refused here with their reason; the rest is opened by
    `_inspect_file`. Linked folders are not walked (they could loop) but listed, so they are
    refused with a reason too instead of vanishing."""
    listing = _Listing([], [], [])

    def refuse(relative: str, reason: str, content: bool = True) -> None:
        listing.rejected.append((relative, reason))
        if content:
            listing.unread.append(relative)

    def record_error(error: OSError) -> None:
        relative = Path(error.filename).relative_to(root).as_posix()
        refuse(relative, f"cannot list folder: {error.strerror or error}")

    for folder, dirnames, filenames in os.walk(root, onerror=record_error):
        here = Path(folder).relative_to(root)
        if not dirnames and not filenames and here != Path("."):
            refuse(here.as_posix(), _empty_folder_reason(here.name), content=False)
        for name in (d for d in dirnames if d.startswith(".")):
            refuse((here / name).as_posix(), HIDDEN_FOLDER)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        linked = [d for d in dirnames if os.path.islink(os.path.join(folder, d))]
        dirnames[:] = [d for d in dirnames if d not in linked]
        for name in filenames + linked:
            relative = (here / name).as_posix()
            if name.startswith("."):
                refuse(relative, HIDDEN_FILE)
            elif not _utf8(relative):
                refuse(relative, NON_UTF8_NAME)
            else:
                listing.files.append(relative)
    listing.files.sort()
    return listing


def _empty_folder_reason(name: str) -> str:
    if PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS:
        return "empty folder (a folder named like an image file)"
    return "empty folder"


def _inspect_file(entry: Entry) -> ImageInfo | Rejection:
    """Manifest fields of one entry, or why it is rejected. Never raises."""
    try:
        return _inspect_or_raise(entry)
    except ImageRejected as rejection:
        return Rejection(str(rejection))
    except Exception as error:  # noqa: BLE001 -- one odd file must not stop the scan
        return Rejection(f"unexpected error: {type(error).__name__}: {error}")


def _inspect_or_raise(entry: Entry) -> ImageInfo | Rejection:
    data = read_entry(entry)
    md5 = hashlib.md5(data).hexdigest()
    try:
        with open_checked(data, entry.limits) as image:
            mode = image.mode  # read before load(): the mode as stored, not as decoded
            load_first_frame(image)  # Image.open only reads the header; this finds truncated data
            width, height = image.size
    except ImageRejected as rejection:
        return Rejection(str(rejection), md5)
    return ImageInfo(hashlib.sha256(data).hexdigest(), md5, len(data), width, height, mode)


def read_entry(entry: Entry) -> bytes:
    """The bytes of one entry, opened only when it is a regular file with an image extension
    inside the folder, or a link to one (outside too with `follow_external_links`).

    The entry is looked at with lstat, a link is resolved and its target checked before anything
    is opened, and the open itself follows no link (`read_inside`): an entry swapped after the
    check is refused, not followed. ImageRejected says why an entry is refused.
    """
    path = os.path.join(entry.root, entry.path)
    try:
        mode, target = os.lstat(path).st_mode, None
        if stat.S_ISLNK(mode):
            target = _link_target(entry)
            mode = os.stat(target).st_mode
    except OSError as error:
        raise ImageRejected(os_reason(error)) from None
    if stat.S_ISDIR(mode):
        raise ImageRejected("symlinked folder (not followed)")
    if not stat.S_ISREG(mode):
        raise ImageRejected(f"not a regular file ({file_kind(mode)})")
    suffix = PurePosixPath(entry.path).suffix
    if suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageRejected(f"unsupported file type '{suffix}'" if suffix else "no file extension")
    if target is None:
        return read_inside(entry.root, entry.path, entry.limits)
    inside = _inside(entry.root, target)
    if inside is not None:
        return read_inside(entry.root, inside, entry.limits)
    return read_regular_file(target, entry.limits, follow=False)


def _link_target(entry: Entry) -> str:
    """The resolved target of a symbolic link that may be followed; ImageRejected says why not."""
    path = os.path.join(entry.root, entry.path)
    try:
        os.stat(path)  # the target's metadata only: nothing is opened
    except OSError as error:
        loop = error.errno == errno.ELOOP
        raise ImageRejected("symbolic link loop" if loop else "broken symbolic link") from None
    target = os.path.realpath(path)
    if _inside(entry.root, target) is None and not entry.follow_external_links:
        raise ImageRejected(
            "symbolic link to outside the data folder (not followed; see follow_external_links)"
        )
    return target


def _inside(root: str, target: str) -> str | None:
    """`target` as a POSIX path relative to `root` when it lies inside `root`, else None."""
    if target == root or os.path.commonpath([root, target]) != root:
        return None
    return Path(target).relative_to(root).as_posix()


def _manifest_frame(accepted: Sequence[tuple[str, ImageInfo]]) -> pl.DataFrame:
    paths = [path for path, _ in accepted]
    class_per_folder = all("/" in path for path in paths)
    rows = {
        "path": paths,
        "sha256": [info.sha256 for _, info in accepted],
        "md5": [info.md5 for _, info in accepted],
        "bytes": [info.size for _, info in accepted],
        "width": [info.width for _, info in accepted],
        "height": [info.height for _, info in accepted],
        "mode": [info.mode for _, info in accepted],
        "label": [path.split("/")[0] if class_per_folder else None for path in paths],
    }
    return pl.DataFrame(rows, schema=MANIFEST_SCHEMA)


def _rejected_frame(rejected: Sequence[tuple[str, str]]) -> pl.DataFrame:
    rows = sorted((printable(path), reason) for path, reason in rejected)
    return pl.DataFrame(
        {"path": [path for path, _ in rows], "reason": [reason for _, reason in rows]},
        schema=REJECTED_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------
# Tables on disk


def read_manifest(path: Path) -> pl.DataFrame:
    """Read a manifest written at ingest, checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"manifest not found: {path} (run the scan first)")
    manifest = pl.read_parquet(path)
    if dict(manifest.schema) != MANIFEST_SCHEMA:
        raise IngestError(
            f"{path} is not an image manifest of this version (columns {list(manifest.columns)}): "
            "run `deepcluster ingest` again"
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# Decode once: manifest -> (N, 3, R, R) uint8 cache


def decode_image(
    source: str | os.PathLike | IO[bytes], resolution: int, limits: ImageLimits | None = None
) -> np.ndarray:
    """Decode one image (a path or a binary file object) to uint8 CHW RGB of shape (3, R, R):
    EXIF orientation applied, shorter side resized to R, centre crop. Refused with ImageRejected
    (before any pixel is decoded) when over `limits` (default: `ImageLimits.from_env()`)."""
    limits = limits or ImageLimits.from_env()
    if isinstance(source, (str, os.PathLike)):
        data = read_regular_file(source, limits)
    else:
        data = source.read(limits.max_bytes + 1)
    return decode_bytes(data, resolution, limits)


def build_cache(
    root: Path,
    manifest: pl.DataFrame,
    resolution: int,
    out_path: Path,
    workers: int = 0,
    limits: ImageLimits | None = None,
    follow_external_links: bool = False,
) -> Path:
    """Decode every manifest row, in order, into `out_path` (.npy, shape (N, 3, R, R), uint8).

    Each file is opened as the scan opened it (`read_entry`): the same links followed, no other.
    The array is written atomically; its `paths.cache_description` records the resolution, the
    count and `manifest_digest(manifest)` so a stale cache can be told apart (`cache_is_current`).
    The whole file is allocated on disk before the memory map is written: a full disk is then an
    error here (`io.DiskFullError`), not a SIGBUS halfway through.
    """
    if manifest.height == 0:
        raise IngestError("cannot build an image cache from an empty manifest")
    real_root, out_path = os.path.realpath(root), Path(out_path)
    limits = limits or ImageLimits.from_env()
    entries = [Entry(real_root, path, follow_external_links, limits) for path in manifest["path"]]
    tasks = [(entry, resolution) for entry in entries]
    shape = (len(tasks), 3, resolution, resolution)
    with atomic_path(out_path) as tmp:
        cache = _preallocated_npy(tmp, shape)
        for index, image in enumerate(_map_in_order(_decode_task, tasks, workers, "cache")):
            cache[index] = image
        cache.flush()
        del cache  # close the memory map before the file is renamed
    # written after the array: a crash in between leaves a description that does not match
    write_json(cache_description(out_path), _cache_description(manifest, resolution))
    return out_path


def _preallocated_npy(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A writable uint8 .npy memory map whose every block is already allocated on disk.

    open_memmap alone makes a sparse file; writing into its holes on a full disk kills the
    process with SIGBUS. posix_fallocate turns that into ENOSPC now, as an OSError.
    """
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # header, sparse body
    if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the sparse file is written as before
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    return np.lib.format.open_memmap(path, mode="r+")


def load_cache(path: Path) -> np.ndarray:
    """Memory-map a cache written by `build_cache` (read-only)."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"image cache not found: {path} (build it with build_cache)")
    return np.load(path, mmap_mode="r")


def manifest_digest(manifest: pl.DataFrame) -> str:
    """sha256 over the manifest's paths and content hashes: changes whenever the image set does."""
    digest = hashlib.sha256()
    for path, sha256 in manifest.select("path", "sha256").iter_rows():
        digest.update(f"{path}\t{sha256}\n".encode())
    return digest.hexdigest()


def cache_is_current(out_path: Path, manifest: pl.DataFrame, resolution: int) -> bool:
    """Whether `out_path` holds the cache `build_cache` would write for this manifest."""
    description = cache_description(out_path)
    if not (Path(out_path).is_file() and description.is_file()):
        return False
    return json.loads(description.read_text()) == _cache_description(manifest, resolution)


def _cache_description(manifest: pl.DataFrame, resolution: int) -> dict[str, Any]:
    return {
        "resolution": resolution,
        "count": manifest.height,
        "manifest_sha256": manifest_digest(manifest),
    }


def _decode_task(task: tuple[Entry, int]) -> np.ndarray:
    entry, resolution = task
    try:
        return decode_bytes(read_entry(entry), resolution, entry.limits)
    except Exception as error:  # the manifest said this file was fine: name it, then stop
        path = os.path.join(entry.root, entry.path)
        raise IngestError(f"cannot decode {path} (changed since the scan?): {error}") from error


# ---------------------------------------------------------------------------------------------
# Ordered map, sequential or over processes, with a progress bar


def _map_in_order(
    function: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str
) -> Iterable[Any]:
    """Yield `function(item)` for each item, in order; `workers > 1` spreads the items over processes."""
    with bar(total=len(items), desc=desc, unit="img") as progress:
        if workers > 1 and len(items) > 1:
            # chunks amortise inter-process traffic but stay small enough to balance the load
            chunksize = max(1, min(64, len(items) // (workers * 4)))
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for result in pool.map(function, items, chunksize=chunksize):
                    progress.update()
                    yield result
        else:
            for item in items:
                result = function(item)
                progress.update()
                yield result
