"""Progress people can read: bars on a terminal, one line per step or epoch anywhere else.

A log file, CI or a DVC stage gets no carriage-return bar updates, only the lines `say` prints.
Both go to stderr, so a command's own output (figures, paths) stays clean on stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
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


def say(message: str, enabled: bool = True) -> None:
    """One line of progress, printed above any bar."""
    if enabled:
        tqdm.write(message, file=sys.stderr)
