"""Ingest a folder of images: validate every file once, then decode once into a memory-mapped cache.

`scan_images` turns a folder into two polars tables. Every non-hidden file lands in exactly one:
the manifest (a fully decoded, usable image) or `rejected` (with a specific reason). Nothing is
silently dropped and no single bad file stops the scan. `build_cache` decodes the manifest's images
to uint8 RGB at the training resolution into one `.npy`, so training epochs never decode again.

Parallel work (`workers > 1`) uses spawned processes: safe beside threaded libraries (polars, torch)
and the same on every OS. A script that calls these functions must guard its entry point with
`if __name__ == "__main__":`, as usual for multiprocessing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import polars as pl

from deepcluster.errors import UserError
from deepcluster.imagefile import (
    MIN_SIDE,  # noqa: F401 -- re-exported: the manifest checks import it from here
    ImageLimits,
    ImageRejected,
    decode_bytes,
    load_first_frame,
    open_checked,
    read_regular_file,
)
from deepcluster.io import atomic_path, write_json
from deepcluster.progress import bar

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


class _ScanTask(NamedTuple):
    """What a (possibly spawned) worker needs to inspect one file."""

    root: str  # the data folder, symbolic links resolved
    path: Path
    follow_external_links: bool
    limits: ImageLimits


# ---------------------------------------------------------------------------------------------
# Scan: folder -> (manifest, rejected)


def scan_images(
    root: Path,
    workers: int = 0,
    follow_external_links: bool = False,
    limits: ImageLimits | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate every file under `root` and return `(manifest, rejected)`, both sorted by path.

    The walk is recursive and sorted. Hidden files and folders (name starting with '.', such as
    `.gitignore`, `.DS_Store` or `.dvc`) are skipped: they are tool metadata, not data. Each image
    is checked against `limits` (default: `ImageLimits.from_env()`) from its size and header, then
    fully decoded (first frame for animations), so truncated files are rejected here rather than
    crashing training. Symbolic links to files outside `root` are rejected unless
    `follow_external_links`; linked folders are never walked (they could loop). A file whose
    bytes equal an earlier accepted file's (in path order) is rejected as a duplicate. Labels are
    filled only when every accepted image sits in a first-level subfolder. An empty manifest is
    returned as is; see `require_images`.
    """
    root = _require_folder(root)
    limits = limits or ImageLimits.from_env()
    entries, unlistable = _list_entries(root)
    named = [entry for entry in entries if _utf8(entry)]
    rejected: list[tuple[str, str]] = list(unlistable)
    rejected += [(entry, NON_UTF8_NAME) for entry in entries if not _utf8(entry)]
    real_root = os.path.realpath(root)
    tasks = [_ScanTask(real_root, root / e, follow_external_links, limits) for e in named]
    infos = _map_in_order(_inspect_file, tasks, workers, "scan")

    accepted: list[tuple[str, ImageInfo]] = []
    first_path_by_hash: dict[str, str] = {}
    for entry, info in zip(named, infos, strict=True):
        if isinstance(info, str):
            rejected.append((entry, info))
        elif info.sha256 in first_path_by_hash:
            rejected.append((entry, f"duplicate of {first_path_by_hash[info.sha256]}"))
        else:
            first_path_by_hash[info.sha256] = entry
            accepted.append((entry, info))
    return _manifest_frame(accepted), _rejected_frame(rejected)


NON_UTF8_NAME = "file or folder name is not valid UTF-8 (rename it to ingest it)"


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
        raise IngestError(f"no usable images in {where}: it holds no files (hidden files skipped)")
    example = rejected.row(0, named=True)
    raise IngestError(
        f"no usable images in {where}: {rejected.height} files rejected, "
        f"e.g. {example['path']}: {example['reason']}"
    )


def _require_folder(root: Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise IngestError(f"data folder not found: {root}")
    if not root.is_dir():
        raise IngestError(f"data folder is not a directory: {root}")
    return root


def _list_entries(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of all non-hidden files, plus folders that could not be listed."""
    entries: list[str] = []
    unlistable: list[tuple[str, str]] = []

    def record_error(error: OSError) -> None:
        relative = Path(error.filename).relative_to(root).as_posix()
        unlistable.append((relative, f"cannot list folder: {error.strerror or error}"))

    for folder, dirnames, filenames in os.walk(root, onerror=record_error):
        # symlinked folders are not walked (they could loop), so they are listed as entries and
        # rejected with a reason instead of vanishing
        linked = [d for d in dirnames if os.path.islink(os.path.join(folder, d))]
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in linked]
        for name in filenames + linked:
            if not name.startswith("."):
                entries.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(entries), unlistable


def _inspect_file(task: _ScanTask) -> ImageInfo | str:
    """Manifest fields of one file, or the reason it is rejected. Never raises."""
    try:
        return _inspect_or_raise(task)
    except ImageRejected as rejection:
        return str(rejection)
    except Exception as error:  # noqa: BLE001 -- one odd file must not stop the scan
        return f"unexpected error: {type(error).__name__}: {error}"


def _inspect_or_raise(task: _ScanTask) -> ImageInfo | str:
    path = task.path
    if path.is_symlink():
        problem = _link_problem(task)
        if problem:
            return problem
    if path.is_dir():
        return "symlinked folder (not followed)"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported file type '{path.suffix}'" if path.suffix else "no file extension"
    data = read_regular_file(path, task.limits)
    with open_checked(data, task.limits) as image:
        mode = image.mode  # read before load(): the mode as stored, not as decoded
        load_first_frame(image)  # Image.open only reads the header; this finds truncated data
        width, height = image.size
    sha256, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
    return ImageInfo(sha256, md5, len(data), width, height, mode)


def _link_problem(task: _ScanTask) -> str | None:
    """Why a symbolic link is refused, or None when it may be followed."""
    try:
        os.stat(task.path)
    except OSError as error:
        loop = error.errno == errno.ELOOP
        return "symbolic link loop" if loop else "broken symbolic link"
    target = os.path.realpath(task.path)
    inside = os.path.commonpath([task.root, target]) == task.root
    if inside or task.follow_external_links:
        return None
    return "symbolic link to outside the data folder (not followed; see follow_external_links)"


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


def write_tables(manifest: pl.DataFrame, rejected: pl.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write `manifest.parquet` and `rejected.parquet` into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    paths = {"manifest": out_dir / "manifest.parquet", "rejected": out_dir / "rejected.parquet"}
    for name, frame in (("manifest", manifest), ("rejected", rejected)):
        with atomic_path(paths[name]) as tmp:
            frame.write_parquet(tmp)
    return paths


def read_manifest(path: Path) -> pl.DataFrame:
    """Read a manifest written by `write_tables`, checking its columns."""
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
) -> Path:
    """Decode every manifest row, in order, into `out_path` (.npy, shape (N, 3, R, R), uint8).

    The array is written atomically; `out_path.with_suffix(".json")` records the resolution, the
    count and `manifest_digest(manifest)` so a stale cache can be told apart (`cache_is_current`).
    The whole file is allocated on disk before the memory map is written: a full disk is then an
    error here (`io.DiskFullError`), not a SIGBUS halfway through.
    """
    if manifest.height == 0:
        raise IngestError("cannot build an image cache from an empty manifest")
    root, out_path = Path(root), Path(out_path)
    limits = limits or ImageLimits.from_env()
    tasks = [(root / path, resolution, limits) for path in manifest["path"]]
    shape = (len(tasks), 3, resolution, resolution)
    with atomic_path(out_path) as tmp:
        cache = _preallocated_npy(tmp, shape)
        for index, image in enumerate(_map_in_order(_decode_task, tasks, workers, "cache")):
            cache[index] = image
        cache.flush()
        del cache  # close the memory map before the file is renamed
    # written after the array: a crash in between leaves a description that does not match
    write_json(out_path.with_suffix(".json"), _cache_description(manifest, resolution))
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
    description = Path(out_path).with_suffix(".json")
    if not (Path(out_path).is_file() and description.is_file()):
        return False
    return json.loads(description.read_text()) == _cache_description(manifest, resolution)


def _cache_description(manifest: pl.DataFrame, resolution: int) -> dict[str, Any]:
    return {
        "resolution": resolution,
        "count": manifest.height,
        "manifest_sha256": manifest_digest(manifest),
    }


def _decode_task(task: tuple[Path, int, ImageLimits]) -> np.ndarray:
    path, resolution, limits = task
    try:
        return decode_image(path, resolution, limits)
    except Exception as error:  # the manifest said this file was fine: name it, then stop
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
