"""One untrusted image, read and decoded with bounded memory and time: ingest, the cache and the
served model all decode through here. Size, pixel count and aspect ratio are checked against
`ImageLimits` (set from the environment) before any pixel is decoded; only `FORMATS` are tried."""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

FORMATS = ("PNG", "JPEG", "BMP", "DIB", "WEBP", "TIFF", "GIF")  # JPEG includes MPO
MIN_SIDE = 2  # a 1-pixel-wide image cannot be resized or cropped meaningfully
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
LIMIT_VARIABLES = {
    "max_bytes": "DEEPCLUSTER_MAX_IMAGE_BYTES",
    "max_pixels": "DEEPCLUSTER_MAX_IMAGE_PIXELS",
    "max_aspect": "DEEPCLUSTER_MAX_IMAGE_ASPECT",
}
# errors Pillow raises for damaged files; anything else is a bug, not a bad image
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


class ImageRejected(ValueError):
    """This image cannot be used; the message is the reason and never contains a path."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 256 * 2**20  # encoded size
    max_pixels: int = 89_478_485  # Pillow's own warning threshold, about 358 MB decoded as RGBA
    max_aspect: float = 100.0  # longer side / shorter side; the resize allocates R x (R * aspect)

    @classmethod
    def from_env(cls) -> ImageLimits:
        """Defaults, each overridden by its environment variable (a positive number)."""
        values = {}
        for field, variable in LIMIT_VARIABLES.items():
            raw = os.environ.get(variable)
            if raw is not None:
                values[field] = _positive(variable, raw, float if field == "max_aspect" else int)
        return cls(**values)

    def check_size(self, width: int, height: int) -> None:
        """Refuse a declared size before any pixel is decoded."""
        if width < MIN_SIDE or height < MIN_SIDE:
            raise ImageRejected(f"image too small ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageRejected(
                f"too many pixels ({width}x{height}; limit {self.max_pixels:,}, "
                f"{LIMIT_VARIABLES['max_pixels']})"
            )
        if max(width, height) > self.max_aspect * min(width, height):
            raise ImageRejected(
                f"extreme aspect ratio ({width}x{height}; limit {self.max_aspect:g}:1, "
                f"{LIMIT_VARIABLES['max_aspect']})"
            )

    def check_bytes(self, size: int) -> None:
        if size == 0:
            raise ImageRejected("empty file (0 bytes)")
        if size > self.max_bytes:
            raise ImageRejected(
                f"file too large ({size:,} bytes; limit {self.max_bytes:,}, "
                f"{LIMIT_VARIABLES['max_bytes']})"
            )


def _positive(variable: str, raw: str, kind: type) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if not value > 0:
        raise UserError(f"{variable}={raw!r}: give a positive {kind.__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Bytes


READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # a FIFO cannot block
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_regular_file(path: str | os.PathLike, limits: ImageLimits, follow: bool = True) -> bytes:
    """The bytes of a regular file within the size limit; anything else is ImageRejected.

    FIFOs, sockets and devices are refused by their type, before and after opening (the open is
    non-blocking, so a FIFO swapped in between cannot block). `follow=False` refuses a symbolic
    link as the last component.
    """
    try:
        _require_regular(os.stat(path, follow_symlinks=follow).st_mode)
        fd = os.open(path, READ_FLAGS | (0 if follow else NOFOLLOW))
    except OSError as error:
        raise ImageRejected(os_reason(error)) from None
    return _read_open(fd, limits)


def read_inside(root: str | os.PathLike, relative: str, limits: ImageLimits) -> bytes:
    """The bytes of the regular file `root/relative` (a POSIX path), within the size limit.

    Every component is opened relative to the folder before it, without following a symbolic
    link: a link or a special file swapped in after a scan looked is refused, never followed out
    of `root`.
    """
    try:
        fd = _open_beneath(os.fspath(root), relative)
    except OSError as error:
        raise ImageRejected(os_reason(error)) from None
    return _read_open(fd, limits)


def _open_beneath(root: str, relative: str) -> int:
    *folders, name = relative.split("/")
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in folders:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW, dir_fd=folder)
            os.close(folder)
            folder = inner
        return os.open(name, READ_FLAGS | NOFOLLOW, dir_fd=folder)
    finally:
        os.close(folder)


def _read_open(fd: int, limits: ImageLimits) -> bytes:
    """Read an open file: refused unless regular and within the limit (checked on the open file)."""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        _require_regular(info.st_mode)
        limits.check_bytes(info.st_size)
        data = handle.read(limits.max_bytes + 1)  # the file may have grown since fstat
    limits.check_bytes(len(data))
    return data


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ImageRejected(f"not a regular file ({file_kind(mode)})")


def file_kind(mode: int) -> str:
    """What a non-regular `st_mode` is, in words."""
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def os_reason(error: OSError) -> str:
    """A reason for an OSError without the file name the error carries."""
    import errno

    named = {
        errno.ENOENT: "no such file (or a broken symbolic link)",
        errno.ELOOP: "symbolic link loop (or a link where none is allowed)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is not a folder",
        errno.ENAMETOOLONG: "file name too long",
    }
    return named.get(error.errno, f"cannot read file: {error.strerror or type(error).__name__}")


# ---------------------------------------------------------------------------------------------
# Header, then pixels


def open_checked(data: bytes, limits: ImageLimits) -> Image.Image:
    """Pillow's lazy image over `data` (header read, no pixels yet), within the limits."""
    limits.check_bytes(len(data))
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageRejected("too many pixels (declared size over Pillow's own limit)") from None
    except UnidentifiedImageError:
        # Pillow's own message names an in-memory buffer address, which differs run to run
        raise ImageRejected("not a decodable image: cannot identify image file") from None
    except DECODE_ERRORS as error:
        raise ImageRejected(f"truncated or corrupt image data: {error}") from None
    try:
        limits.check_size(*image.size)
    except ImageRejected:
        image.close()
        raise
    return image


def load_first_frame(image: Image.Image) -> None:
    """Decode the pixels of the first frame (animations: the frame ingest validated)."""
    try:
        image.seek(0)
        image.load()
    except DECODE_ERRORS as error:
        raise ImageRejected(f"truncated or corrupt image data: {error}") from None


def decode_bytes(data: bytes, resolution: int, limits: ImageLimits) -> np.ndarray:
    """Encoded bytes -> uint8 CHW RGB (3, R, R): upright, shorter side resized to R, centre crop."""
    with open_checked(data, limits) as image:
        load_first_frame(image)
        rgb = to_rgb(upright(image))
    square = resize_and_crop(rgb, resolution)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))


def decode_file(path: str | os.PathLike, resolution: int, limits: ImageLimits) -> np.ndarray:
    return decode_bytes(read_regular_file(Path(path), limits), resolution, limits)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as viewers do; a damaged EXIF block leaves the image as is."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 -- unreadable metadata must not cost a good image
        return image


def to_rgb(image: Image.Image) -> Image.Image:
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


def resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    # Pillow's resize antialiases when shrinking: the filter support widens with the scale
    resized = image.resize(new_size, Image.Resampling.BILINEAR)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return resized.crop((left, top, left + resolution, top + resolution))
