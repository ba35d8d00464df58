"""Library errors as Dagster failures: a user's mistake is reported plainly and never retried."""

import contextlib
from collections.abc import Iterator

from dagster import Failure

from deepcluster.errors import UserError


@contextlib.contextmanager
def user_errors_fail_plainly() -> Iterator[None]:
    """Turn a `UserError` (bad path, bad parameter, missing input) into a Failure without retries.

    Retrying cannot fix what a person has to fix, and the message is what they need to read.
    """
    try:
        yield
    except UserError as err:
        raise Failure(description=str(err), allow_retries=False) from err
