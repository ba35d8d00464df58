"""User errors: bad input the user can fix. The CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Something the user gave (a path, a parameter, a file) is wrong; the message says what."""


class ParamError(UserError, ValueError):
    """A hyperparameter is missing, unknown or out of range; the message says which and why."""


class MissingArtifact(UserError, FileNotFoundError):
    """A step's input is not there yet: an earlier step has to run first."""
