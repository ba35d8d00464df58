"""User errors (bad input the user can fix) and stops (Ctrl-C, SIGTERM): the CLI prints either as
one line, without a traceback."""

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Something the user gave (a path, a parameter, a file) is wrong; the message says what."""


class ParamError(UserError, ValueError):
    """A hyperparameter is missing, unknown or out of range; the message says which and why."""


class MissingArtifact(UserError, FileNotFoundError):
    """A step's input is not there yet: an earlier step has to run first."""


class Stopped(BaseException):
    """Someone asked the process to stop (Ctrl-C, SIGTERM): not an error of the code or the input.

    A BaseException, so no `except Exception` in between catches it; steps unwind, mark their
    MLflow run KILLED and keep their last checkpoint."""


_held = {"depth": 0, "signal": None}  # a stop that arrived inside `stop_held`, raised at its end


def stop_on_signals() -> None:
    """Turn SIGINT and SIGTERM into `Stopped`, raised in the main thread between two
    operations: a training stops within the batch it is on."""

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _held["depth"]:
            _held["signal"] = _held["signal"] or name
            return
        raise Stopped(f"signal {name}")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


@contextmanager
def stop_held() -> Iterator[None]:
    """A stop waits for the end of the block: a writer interrupted mid-file (torch's zip writer)
    raises an error of its own while cleaning up, which would hide the stop behind a traceback."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["signal"]:
            name, _held["signal"] = _held["signal"], None
            raise Stopped(f"signal {name}")  # also over an error of the block: a stop was asked
