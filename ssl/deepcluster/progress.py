"""Progress people can read: bars on a terminal, one line per step or epoch anywhere else.

A log file, CI or a DVC stage gets no carriage-return bar updates, only the lines `say` prints.
Both go to stderr, so a command's own output (figures, paths) stays clean on stdout.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def bar(iterable: Iterable | None = None, desc: str = "", enabled: bool = True, **kwargs: Any):
    """A tqdm bar on a terminal when `enabled`; silent (but still iterable) otherwise."""
    return tqdm(
        iterable, desc=desc, disable=not (enabled and interactive()), leave=False,
        file=sys.stderr, dynamic_ncols=True, **kwargs,
    )


_sink: Callable[[str], None] | None = None  # where `say` sends lines instead of stderr


def say(message: str, enabled: bool = True) -> None:
    """One line of progress, printed above any bar (or handed to `lines_to`'s sink)."""
    if enabled:
        if _sink is not None:
            _sink(message)
        else:
            tqdm.write(message, file=sys.stderr)


@contextlib.contextmanager
def lines_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Send every progress line to `sink` (a Dagster log) while the block runs."""
    global _sink
    previous, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = previous
