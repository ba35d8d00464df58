"""Atomic file writes: a reader never sees a half-written artifact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

# below this many free bytes (or 1% of a small filesystem), a failed write is a full disk
NEARLY_FULL = 2**20


class DiskFullError(UserError, OSError):
    """A write ran out of disk space; the message names the file and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the artifact the mode a plain open() would have
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    except Exception as error:
        if _disk_full(error, final.parent):  # checked before the partial file is removed
            raise DiskFullError(
                f"no space left on the device to write {final}: free some space and run again"
            ) from error
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(final)  # some writers (posix_fallocate) name no file
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _disk_full(error: Exception, folder: Path) -> bool:
    """Whether a failed write failed for lack of space.

    Writers report it differently (OSError ENOSPC; numpy an OSError without errno; polars a
    ComputeError; torch a RuntimeError), so besides the errno, any failure on a filesystem left
    (nearly) full counts.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        fs = os.statvfs(folder)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < min(NEARLY_FULL, fs.f_blocks * fs.f_frsize // 100)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def publish_dir(staged: Path, final: Path) -> None:
    """Put the folder `staged` in place of `final` (which may not exist yet).

    Two renames: the old folder is moved aside, the new one takes its name, then the old one is
    removed. A crash between the renames leaves no `final`; `recover_dir` puts the old one back.
    """
    aside = _aside(final)
    if aside.exists():
        shutil.rmtree(aside)
    if final.exists():
        os.replace(final, aside)
    os.replace(staged, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(final: Path) -> bool:
    """Undo a publish that stopped between its renames; True when something was put back."""
    aside = _aside(final)
    if final.exists() or not aside.exists():
        return False
    os.replace(aside, final)
    return True


SET_MARKER = "COMMITTED"


def publish_set(staged: Path, root: Path, names: list[str]) -> None:
    """Put the folders `staged/<name>` in place of `root/<name>`, as one set: all or none.

    Writing the marker (one atomic rename) commits the set. A failure before it leaves every
    previous folder in force; after it, the renames are finished by `finish_set`, even after a
    crash, so a reader never keeps a mix of old and new for long (each step checks that what it
    reads belongs together)."""
    write_json(staged / SET_MARKER, sorted(names))
    finish_set(staged, root)


def finish_set(staged: Path, root: Path) -> bool:
    """Finish a committed `publish_set` that stopped between its renames, or remove a staging
    folder its writer left uncommitted; True when a set was published. Only the lock holder calls
    this."""
    marker = staged / SET_MARKER
    if not marker.exists():
        shutil.rmtree(staged, ignore_errors=True)
        return False
    for name in json.loads(marker.read_text()):
        if (staged / name).exists():
            publish_dir(staged / name, root / name)
    shutil.rmtree(staged)
    return True


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.previous")


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files writers killed mid-write left behind (`.<name>.*.tmp`).

    Only called by the lock holder, so no live writer owns them."""
    count = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def save_npy(path: str | os.PathLike, array) -> Path:
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
    return Path(path)


def save_parquet(path: str | os.PathLike, frame) -> Path:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)
    return Path(path)
