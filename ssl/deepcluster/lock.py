"""One writer per artifacts folder: an exclusive lock held for the whole of a step.

Two trainings into one folder would both finish and one result would silently win. The lock is
`flock` on `<artifacts>/.lock`: the kernel releases it when the holder exits, even after kill -9,
so a stale lock never blocks anyone. The file records who holds it, for the error message. The
lock is re-entrant within a thread: the CLI takes it before its heavy imports, so a second writer is
refused at once, and the step it then calls takes it again. This module stays light to import.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator

from .errors import UserError
from .paths import Artifacts


class Busy(UserError):
    """Another process is writing into the same artifacts folder."""


_held = threading.local()  # .locks: the lock files this thread holds


def holds(art: Artifacts) -> bool:
    """Whether this thread holds the lock of `art` (inside a `writing` block)."""
    return os.path.realpath(art.lock) in getattr(_held, "locks", set())


@contextlib.contextmanager
def writing(art: Artifacts, step: str) -> Iterator[None]:
    """Hold the folder's lock while `step` writes into it; refuse at once if another holds it."""
    art.root.mkdir(parents=True, exist_ok=True)
    if holds(art):  # taken earlier by this thread (the CLI): keep it
        yield
        return
    key = os.path.realpath(art.lock)
    fd = os.open(art.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{art.root} is being written by {_holder(fd)}; wait for it to finish "
                       "or use another --artifacts folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "step": step, "since": time.time()}).encode(), 0)
        _held.locks = getattr(_held, "locks", set()) | {key}
        yield
    finally:
        _held.locks = getattr(_held, "locks", set()) - {key}
        os.close(fd)  # closing releases the lock


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%H:%M:%S", time.localtime(who["since"]))
        return f"`deepcluster {who['step']}` (pid {who['pid']}, since {since})"
    except (ValueError, KeyError, OSError):
        return "another process"
