"""User errors: bad input the user can fix. The CLI prints these as one line, without a traceback."""


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


def stop_on_signals() -> None:
    """Turn SIGINT and SIGTERM into `Stopped`, raised in the main thread between two
    operations: a training stops within the batch it is on."""
    import signal

    def handler(signum, frame):
        raise Stopped(f"signal {signal.Signals(signum).name}")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
