"""Every file lock of the project, from `filelock` (flock: the kernel releases it if its holder
dies). `writing`: one writer per artifacts folder, a second refused at once; re-entrant within a
thread (the CLI takes it before its heavy imports, the step again). `waiting`: wait for a brief
holder (a local MLflow store's first migration, a promotion). No torch or MLflow imports."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError
from .paths import LOCK_SUFFIX, Artifacts


class Busy(UserError):
    """Another process is writing into the same artifacts folder."""


def _lock(path: Path | str) -> FileLock:
    # one object per file, so a thread re-enters its own lock; its state is per thread, so another
    # thread of the same process is refused like another process
    return FileLock(os.path.realpath(path), is_singleton=True, thread_local=True)


def holds(art: Artifacts) -> bool:
    """Whether this thread holds the lock of `art` (inside a `writing` block)."""
    return _lock(art.lock).is_locked


@contextlib.contextmanager
def writing(art: Artifacts, step: str) -> Iterator[None]:
    """Hold the folder's lock while `step` writes into it; refuse at once if another holds it."""
    art.root.mkdir(parents=True, exist_ok=True)
    lock = _lock(art.lock)
    outermost = not lock.is_locked
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise Busy(f"{art.root} is being written by {_holder(art.lock)}; wait for it to finish "
                   "or use another --artifacts folder") from None
    try:
        if outermost:  # who holds it, for the message of a refused writer
            who = {"pid": os.getpid(), "step": step, "since": time.time()}
            Path(lock.lock_file).write_text(json.dumps(who))
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def waiting(guarded: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold the lock file beside `guarded` (`<name>.lock`), waiting up to `timeout` seconds (-1:
    for ever) for its holder."""
    path = guarded.with_name(guarded.name + LOCK_SUFFIX)
    lock = _lock(path)
    try:
        lock.acquire(timeout=timeout, poll_interval=0.05)
    except Timeout:
        raise UserError(f"{what} held {path} for {timeout:g} s") from None
    try:
        yield
    finally:
        lock.release()


def _holder(path: Path) -> str:
    try:
        who = json.loads(Path(path).read_text() or "{}")
        since = time.strftime("%H:%M:%S", time.localtime(who["since"]))
        return f"`deepcluster {who['step']}` (pid {who['pid']}, since {since})"
    except (ValueError, KeyError, OSError):
        return "another process"
