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

import hashlib
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from deepcluster.errors import UserError
from deepcluster.io import atomic_path, write_json

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MIN_SIDE = 2  # a 1-pixel-wide image cannot be resized or cropped meaningfully

MANIFEST_SCHEMA = {
    "path": pl.Utf8,  # relative POSIX path under the data folder
    "sha256": pl.Utf8,  # hex digest of the file's bytes
    "bytes": pl.Int64,
    "width": pl.Int32,
    "height": pl.Int32,
    "mode": pl.Utf8,  # PIL mode as stored in the file: "L", "RGB", "RGBA", "P", ...
    "label": pl.Utf8,  # first-level folder name when the layout is class-per-folder, else null
}
REJECTED_SCHEMA = {"path": pl.Utf8, "reason": pl.Utf8}

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class IngestError(UserError, ValueError):
    """The data folder or an ingest artifact cannot be used; the message says which and why."""


class ImageInfo(NamedTuple):
    sha256: str
    size: int
    width: int
    height: int
    mode: str


# ---------------------------------------------------------------------------------------------
# Scan: folder -> (manifest, rejected)


def scan_images(root: Path, workers: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate every file under `root` and return `(manifest, rejected)`, both sorted by path.

    The walk is recursive and sorted. Hidden files and folders (name starting with '.', such as
    `.gitignore`, `.DS_Store` or `.dvc`) are skipped: they are tool metadata, not data. Each image
    is fully decoded (first frame for animations), so truncated files are rejected here rather
    than crashing training. A file whose bytes equal an earlier accepted file's (in path order) is
    rejected as a duplicate. Labels are filled only when every accepted image sits in a
    first-level subfolder. An empty manifest is returned as is; see `require_images`.
    """
    root = _require_folder(root)
    entries, unlistable = _list_entries(root)
    infos = _map_in_order(_inspect_file, [root / entry for entry in entries], workers, "scan")

    accepted: list[tuple[str, ImageInfo]] = []
    rejected: list[tuple[str, str]] = list(unlistable)
    first_path_by_hash: dict[str, str] = {}
    for entry, info in zip(entries, infos, strict=True):
        if isinstance(info, str):
            rejected.append((entry, info))
        elif info.sha256 in first_path_by_hash:
            rejected.append((entry, f"duplicate of {first_path_by_hash[info.sha256]}"))
        else:
            first_path_by_hash[info.sha256] = entry
            accepted.append((entry, info))
    return _manifest_frame(accepted), _rejected_frame(rejected)


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


def _inspect_file(path: Path) -> ImageInfo | str:
    """Manifest fields of one file, or the reason it is rejected. Never raises."""
    try:
        return _inspect_or_raise(path)
    except Exception as error:  # noqa: BLE001 -- one odd file must not stop the scan
        return f"unexpected error: {type(error).__name__}: {error}"


def _inspect_or_raise(path: Path) -> ImageInfo | str:
    if path.is_dir():
        return "symlinked folder (not followed)"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported file type '{path.suffix}'" if path.suffix else "no file extension"
    if not path.is_file():
        return "broken symbolic link" if path.is_symlink() else "not a regular file"
    try:
        data = path.read_bytes()
    except PermissionError:
        return "permission denied"
    except OSError as error:
        return f"cannot read file: {error.strerror or error}"
    if not data:
        return "empty file (0 bytes)"
    try:
        width, height, mode = _decode_fully(data)
    except Image.DecompressionBombError as error:
        return f"image too large: {error}"
    except UnidentifiedImageError:
        # Pillow's own message names an in-memory buffer address, which differs run to run
        return "not a decodable image: cannot identify image file"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return f"truncated or corrupt image data: {error}"
    if width < MIN_SIDE or height < MIN_SIDE:
        return f"image too small ({width}x{height})"
    return ImageInfo(hashlib.sha256(data).hexdigest(), len(data), width, height, mode)


def _decode_fully(data: bytes) -> tuple[int, int, str]:
    with Image.open(io.BytesIO(data)) as image:
        mode = image.mode  # read before load(): the mode as stored, not as decoded
        image.load()  # Image.open only reads the header; load() finds truncated pixel data
        return image.width, image.height, mode


def _manifest_frame(accepted: Sequence[tuple[str, ImageInfo]]) -> pl.DataFrame:
    paths = [path for path, _ in accepted]
    class_per_folder = all("/" in path for path in paths)
    rows = {
        "path": paths,
        "sha256": [info.sha256 for _, info in accepted],
        "bytes": [info.size for _, info in accepted],
        "width": [info.width for _, info in accepted],
        "height": [info.height for _, info in accepted],
        "mode": [info.mode for _, info in accepted],
        "label": [path.split("/")[0] if class_per_folder else None for path in paths],
    }
    return pl.DataFrame(rows, schema=MANIFEST_SCHEMA)


def _rejected_frame(rejected: Sequence[tuple[str, str]]) -> pl.DataFrame:
    rows = sorted(rejected)
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
        raise IngestError(f"{path} is not an image manifest: columns {dict(manifest.schema)}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Decode once: manifest -> (N, 3, R, R) uint8 cache


def decode_image(path: Path, resolution: int) -> np.ndarray:
    """Decode one image to uint8 CHW RGB of shape (3, R, R): shorter side resized to R, centre crop."""
    with Image.open(path) as image:
        image.seek(0)  # animations: the first frame, as validated by the scan
        rgb = _to_rgb(image)
    square = _resize_and_crop(rgb, resolution)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert explicitly by mode, so transparency and high bit depths do not turn out black."""
    if image.mode in HIGH_DEPTH_MODES:
        return _stretch_to_8bit(image).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("L", "1"):
        return image.convert("L").convert("RGB")  # grey replicated to three channels
    return image.convert("RGB")


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """Map the image's actual value range onto 0..255 (a constant image becomes black)."""
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))


def _resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    # Pillow's resize antialiases when shrinking: the filter support widens with the scale
    resized = image.resize(new_size, Image.Resampling.BILINEAR)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution))


def build_cache(
    root: Path, manifest: pl.DataFrame, resolution: int, out_path: Path, workers: int = 0
) -> Path:
    """Decode every manifest row, in order, into `out_path` (.npy, shape (N, 3, R, R), uint8).

    The array is written atomically; `out_path.with_suffix(".json")` records the resolution, the
    count and `manifest_digest(manifest)` so a stale cache can be told apart (`cache_is_current`).
    """
    if manifest.height == 0:
        raise IngestError("cannot build an image cache from an empty manifest")
    root, out_path = Path(root), Path(out_path)
    tasks = [(root / path, resolution) for path in manifest["path"]]
    shape = (len(tasks), 3, resolution, resolution)
    with atomic_path(out_path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for index, image in enumerate(_map_in_order(_decode_task, tasks, workers, "cache")):
            cache[index] = image
        cache.flush()
        del cache  # close the memory map before the file is renamed
    # written after the array: a crash in between leaves a description that does not match
    write_json(out_path.with_suffix(".json"), _cache_description(manifest, resolution))
    return out_path


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


def _decode_task(task: tuple[Path, int]) -> np.ndarray:
    path, resolution = task
    try:
        return decode_image(path, resolution)
    except Exception as error:  # the manifest said this file was fine: name it, then stop
        raise IngestError(f"cannot decode {path} (changed since the scan?): {error}") from error


# ---------------------------------------------------------------------------------------------
# Ordered map, sequential or over processes, with a progress bar


def _map_in_order(
    function: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str
) -> Iterable[Any]:
    """Yield `function(item)` for each item, in order; `workers > 1` spreads the items over processes."""
    with tqdm(total=len(items), desc=desc, file=sys.stderr, unit="img") as progress:
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
