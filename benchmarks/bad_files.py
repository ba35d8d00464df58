"""Bad-file corpus: many kinds of broken, odd or hostile file mixed with good images, ingested.

Each kind writes one or more files into a folder and says, for each, whether ingest must accept it
(a valid image, however unusual) or reject it (with a reason). The scoreboard counts the kinds
tried, the kinds handled (every file ended where it should, every rejection with a specific
reason), crashes (an exception out of the scan or the cache build, or a reason that only says
"unexpected error") and good files lost (a file that should have been accepted but was not).

    PYTHONPATH=ssl:. .venv/bin/python benchmarks/bad_files.py [FOLDER]

tests/test_bad_files.py runs the same corpus and requires a perfect score.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from deepcluster.data import build_cache, printable, scan_images
from deepcluster.imagefile import ImageLimits

ACCEPT, REJECT = "accept", "reject"
LIMITS = ImageLimits(max_bytes=4 * 2**20)  # the defaults, but a 4 MiB file limit to exercise it
RED, BLUE = (255, 0, 0), (0, 0, 255)

# kind -> function(folder) -> {relative name (str, or bytes for non-UTF-8 names): expectation}
KINDS: dict[str, Callable[[Path], dict[str | bytes, str]]] = {}


def kind(function: Callable[[Path], dict[str | bytes, str]]):
    KINDS[function.__name__] = function
    return function


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def picture(size=(16, 12), seed=0, mode="RGB") -> Image.Image:
    """Random pixels, so no two pictures (and no two files) are equal."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def write(folder: Path, name: str | bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png(width: int, height: int, rows: Callable[[], bytes] | None, color_type: int = 0) -> bytes:
    """A hand-made 8-bit PNG; `rows()` gives the raw scanlines, streamed through zlib."""
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    if rows is not None:
        body += png_chunk(b"IDAT", rows())
    return body + png_chunk(b"IEND", b"")


def zeros_stream(row_bytes: int, height: int) -> Callable[[], bytes]:
    """Scanlines of zeros (filter byte 0 + pixels), compressed without ever holding them all."""

    def compress() -> bytes:
        packer, out, row = zlib.compressobj(9), [], b"\0" * (row_bytes + 1)
        block = row * max(1, 2**20 // len(row))
        whole, rest = divmod(height * len(row), len(block))
        out += [packer.compress(block) for _ in range(whole)]
        out += [packer.compress(block[:rest]), packer.flush()]
        return b"".join(out)

    return compress


# ---------------------------------------------------------------------------------------------
# Valid images, ordinary and unusual: all must be accepted


@kind
def good_plain(folder: Path):
    names = {}
    for i in range(10):
        fmt, suffix = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        write(folder, f"good/plain_{i}.{suffix}", encode(picture(seed=100 + i), fmt))
        names[f"good/plain_{i}.{suffix}"] = ACCEPT
    return names


def _single(name: str, data: bytes, expect: str = ACCEPT):
    def make(folder: Path):
        write(folder, name, data)
        return {name: expect}

    return make


def _frames(fmt: str) -> bytes:
    first, second = picture(seed=1), picture(seed=2)
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)


def _exif_rotated() -> bytes:
    """Stored red on top, blue below; EXIF orientation 6 shows it turned 90 degrees clockwise."""
    image = Image.new("RGB", (16, 16), BLUE)
    image.paste(Image.new("RGB", (16, 8), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif, quality=95)


def _adam7_png(size: int = 8) -> bytes:
    """An interlaced (Adam7) greyscale PNG, built pass by pass."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
              (0, 1, 1, 2))  # fmt: skip
    pixels = (np.arange(size * size, dtype=np.uint8) * 3).reshape(size, size)
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = pixels[y0::dy, x0::dx]
        raw += b"".join(b"\0" + row.tobytes() for row in sub if sub.shape[1])
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def _palette_transparent() -> bytes:
    image = picture(seed=3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def _float_tiff() -> bytes:
    values = np.linspace(-1.5, 7.25, 16 * 12, dtype=np.float32).reshape(12, 16)
    return encode(Image.fromarray(values, mode="F"), "TIFF")


def _corrupt_exif_jpeg() -> bytes:
    data = encode(picture(seed=9), "JPEG")
    app1 = b"Exif\0\0" + b"MM\0*\0\0\0\x08" + b"\xff" * 40  # an IFD that points nowhere
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


ACCEPTED_ODDITIES = {
    "animated_gif": ("odd/animated.gif", lambda: _frames("GIF")),
    "animated_png": ("odd/animated.png", lambda: _frames("PNG")),
    "cmyk_jpeg": ("odd/cmyk.jpg", lambda: encode(picture(seed=4, mode="CMYK"), "JPEG")),
    "png_16_bit": ("odd/deep.png", lambda: encode(
        Image.fromarray(np.arange(192, dtype=np.uint16).reshape(12, 16) * 300), "PNG")),
    "float_tiff": ("odd/float.tif", _float_tiff),
    "palette_with_transparency": ("odd/palette.png", _palette_transparent),
    "grey_alpha_png": ("odd/grey_alpha.png", lambda: encode(picture(seed=5, mode="LA"), "PNG")),
    "one_bit_png": ("odd/bits.png", lambda: encode(picture(seed=6, mode="1"), "PNG")),
    "exif_rotated_jpeg": ("odd/rotated.jpg", _exif_rotated),
    "progressive_jpeg": ("odd/progressive.jpg", lambda: encode(
        picture(seed=7), "JPEG", progressive=True)),
    "interlaced_gif": ("odd/interlaced.gif", lambda: encode(picture(seed=8), "GIF", interlace=1)),
    "interlaced_png": ("odd/adam7.png", _adam7_png),
    "bmp": ("odd/plain.bmp", lambda: encode(picture(seed=10), "BMP")),
    "webp": ("odd/plain.webp", lambda: encode(picture(seed=11), "WEBP", lossless=True)),
    "multipage_tiff": ("odd/pages.tiff", lambda: _frames("TIFF")),
    "jpeg_with_trailing_garbage": ("odd/trailing.jpg", lambda: encode(
        picture(seed=12), "JPEG") + b"garbage after the end marker"),
    "corrupt_exif_jpeg": ("odd/bad_exif.jpg", _corrupt_exif_jpeg),
    "png_named_jpg": ("odd/really_png.jpg", lambda: encode(picture(seed=13), "PNG")),
    "upper_case_extension": ("odd/SHOUT.PNG", lambda: encode(picture(seed=14), "PNG")),
    "wide_within_limit": ("odd/wide.png", lambda: encode(picture((1000, 20), seed=15), "PNG")),
    "name_with_newline": ("odd/new\nline.png", lambda: encode(picture(seed=16), "PNG")),
    "unicode_name": ("odd/été ☀ photo.png", lambda: encode(picture(seed=17), "PNG")),
    "long_name": ("odd/" + "n" * 240 + ".png", lambda: encode(picture(seed=18), "PNG")),
    "deeply_nested": ("odd/" + "/".join("d" * 12) + "/deep.png",
                      lambda: encode(picture(seed=19), "PNG")),
    "folder_named_like_an_image": ("odd/folder.png/inside.png",
                                   lambda: encode(picture(seed=20), "PNG")),
}  # fmt: skip

for _name, (_path, _make) in ACCEPTED_ODDITIES.items():
    KINDS[_name] = lambda folder, path=_path, make=_make: _single(path, make())(folder)


# ---------------------------------------------------------------------------------------------
# Broken or hostile files: all must be rejected with a reason


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


NOISE = picture((64, 64), seed=21)  # incompressible: cutting the file cuts the pixel data
REJECTED_FILES = {
    "zero_bytes": ("bad/empty.png", lambda: b""),
    "truncated_png": ("bad/truncated.png", lambda: _truncated(encode(NOISE, "PNG"))),
    "truncated_jpeg": ("bad/truncated.jpg", lambda: _truncated(encode(NOISE, "JPEG"))),
    "truncated_gif": ("bad/truncated.gif", lambda: _truncated(encode(NOISE, "GIF"))),
    "jpeg_header_only": ("bad/soi.jpg", lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"),
    "png_signature_only": ("bad/signature.png", lambda: b"\x89PNG\r\n\x1a\n"),
    "text_named_png": ("bad/notes.png", lambda: b"shot on a sunny day\n"),
    "html_named_jpg": ("bad/page.jpg", lambda: b"<!doctype html><html><body>404</body></html>"),
    "svg_named_png": ("bad/vector.png", lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
    "postscript_named_png": ("bad/print.png", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n"
                             b"%%BoundingBox: 0 0 10 10\nshowpage\n"),
    "random_bytes": ("bad/noise.png", lambda: np.random.default_rng(22).bytes(4096)),
    "wrong_extension_txt": ("bad/image.txt", lambda: encode(picture(seed=23), "PNG")),
    "no_extension": ("bad/README", lambda: encode(picture(seed=24), "PNG")),
    "one_pixel": ("bad/dot.png", lambda: encode(picture((1, 1), seed=25), "PNG")),
    "zero_width_header": ("bad/zero_width.png", lambda: png(0, 10, zeros_stream(0, 10))),
    "decompression_bomb": ("bad/bomb.png", lambda: png(12_000, 12_000, zeros_stream(12_000,
                                                                                      12_000))),
    "two_by_two_million": ("bad/needle.png", lambda: png(2, 2_000_000, zeros_stream(2, 2_000_000))),
    "extreme_aspect_small": ("bad/sliver.png", lambda: encode(picture((2, 300), seed=26), "PNG")),
    "huge_declared_tiny_file": ("bad/huge.png", lambda: png(50_000, 50_000, None)),
    "big_declared_no_pixels": ("bad/hollow.png", lambda: png(4_000, 3_000, None)),
    "corrupt_header_crc": ("bad/crc.png", lambda: _bad_crc(encode(picture(seed=27), "PNG"))),
    "text_chunk_bomb": ("bad/ztxt.png", lambda: _ztxt_bomb(encode(picture(seed=28), "PNG"))),
    "corrupt_tiff": ("bad/broken.tif", lambda: b"II*\x00\x08\x00\x00\x00" + b"\xff" * 64),
    "over_byte_limit": ("bad/large.bmp", lambda: encode(picture((1300, 1100), seed=29), "BMP")),
}  # fmt: skip


def _bad_crc(data: bytes) -> bytes:
    at = 8 + 8 + 13  # signature, IHDR length and tag, IHDR body: the CRC follows
    return data[:at] + bytes(b ^ 0xFF for b in data[at : at + 4]) + data[at + 4 :]


def _ztxt_bomb(data: bytes) -> bytes:
    """A zTXt chunk inflating to 64 MB, placed before the pixels."""
    text = b"Comment\0\0" + zlib.compress(b"A" * 64 * 2**20, 9)
    at = 8 + 25  # after the signature and the IHDR chunk
    return data[:at] + png_chunk(b"zTXt", text) + data[at:]


for _name, (_path, _make) in REJECTED_FILES.items():
    KINDS[_name] = lambda folder, path=_path, make=_make: _single(path, make(), REJECT)(folder)


@kind
def duplicate(folder: Path):
    data = encode(picture(seed=30), "PNG")
    write(folder, "dup/a_original.png", data)
    write(folder, "dup/b_copy.png", data)
    return {"dup/a_original.png": ACCEPT, "dup/b_copy.png": REJECT}


@kind
def fifo(folder: Path):
    os.makedirs(folder / "special", exist_ok=True)
    os.mkfifo(folder / "special" / "pipe.png")
    return {"special/pipe.png": REJECT}


@kind
def unix_socket(folder: Path):
    os.makedirs(folder / "special", exist_ok=True)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "special" / "socket.png"))
    server.close()  # the socket file stays
    return {"special/socket.png": REJECT}


@kind
def broken_symlink(folder: Path):
    os.makedirs(folder / "links", exist_ok=True)
    os.symlink(folder / "links" / "missing.png", folder / "links" / "broken.png")
    return {"links/broken.png": REJECT}


@kind
def symlink_loop(folder: Path):
    os.makedirs(folder / "links", exist_ok=True)
    os.symlink("loop.png", folder / "links" / "loop.png")
    return {"links/loop.png": REJECT}


@kind
def symlink_out_of_folder(folder: Path):
    outside = Path(tempfile.mkdtemp(prefix="outside-"))
    (outside / "secret.png").write_bytes(encode(picture(seed=31), "PNG"))
    os.makedirs(folder / "links", exist_ok=True)
    os.symlink(outside / "secret.png", folder / "links" / "escape.png")
    return {"links/escape.png": REJECT}


@kind
def symlink_inside_folder(folder: Path):
    write(folder, "links/target.png", encode(picture(seed=32), "PNG"))
    os.symlink("target.png", folder / "links" / "within.png")  # same bytes: a duplicate
    return {"links/target.png": ACCEPT, "links/within.png": REJECT}


@kind
def symlinked_folder(folder: Path):
    write(folder, "real_dir/inside_real.png", encode(picture(seed=33), "PNG"))
    os.symlink("real_dir", folder / "linked_dir")
    return {"real_dir/inside_real.png": ACCEPT, "linked_dir": REJECT}


@kind
def non_utf8_name(folder: Path):
    write(folder, b"names/caf\xe9.png", encode(picture(seed=34), "PNG"))
    return {b"names/caf\xe9.png": REJECT}


@kind
def non_utf8_folder(folder: Path):
    write(folder, b"names/\xff\xfe/inside.png", encode(picture(seed=35), "PNG"))
    return {b"names/\xff\xfe/inside.png": REJECT}


# ---------------------------------------------------------------------------------------------
# Ingest the corpus, score it


@dataclass
class Score:
    kinds: int = 0
    handled: int = 0
    crashes: int = 0
    good_lost: int = 0
    files: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"bad-file corpus: {self.kinds} kinds tried, {self.handled} handled, "
            f"{self.crashes} crashes, {self.good_lost} good files lost "
            f"({self.files} files: {self.accepted} accepted, {self.rejected} rejected)"
        )


def make_corpus(folder: Path) -> dict[str, dict[str | bytes, str]]:
    return {name: make(folder) for name, make in KINDS.items()}


def score(folder: Path, expected: dict[str, dict[str | bytes, str]], cache: Path) -> Score:
    result = Score(kinds=len(expected))
    try:
        manifest, rejected = scan_images(folder, limits=LIMITS)
        build_cache(folder, manifest, 16, cache, limits=LIMITS)
    except Exception as error:  # noqa: BLE001 -- the scoreboard reports it as a crash
        result.crashes = len(expected)
        result.failures.append(f"crash: {type(error).__name__}: {error}")
        return result
    accepted = set(manifest["path"].to_list())
    reasons = dict(rejected.iter_rows())
    result.accepted, result.rejected = len(accepted), len(reasons)
    for name, files in expected.items():
        problems = [_judge(f, want, accepted, reasons) for f, want in files.items()]
        problems = [p for p in problems if p]
        result.files += len(files)
        result.crashes += any("unexpected error" in p for p in problems)
        result.good_lost += sum(
            1 for f, want in files.items() if want == ACCEPT and _text(f) not in accepted
        )
        result.handled += not problems
        result.failures += [f"{name}: {p}" for p in problems]
    return result


def _text(name: str | bytes) -> str:
    return printable(os.fsdecode(name))


def _judge(name: str | bytes, want: str, accepted: set[str], reasons: dict[str, str]) -> str:
    text = _text(name)
    if want == ACCEPT:
        return "" if text in accepted else f"{text!r} lost: {reasons.get(text, 'not listed')}"
    reason = reasons.get(text)
    if reason is None:
        return f"{text!r} should be rejected but was {'accepted' if text in accepted else 'lost'}"
    return f"{text!r}: {reason}" if reason.startswith("unexpected error") else ""


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="corpus-"))
    expected = make_corpus(folder)
    result = score(folder, expected, folder.parent / f"{folder.name}-cache.npy")
    print(result.line())
    for failure in result.failures:
        print("  " + failure)


if __name__ == "__main__":
    main()
