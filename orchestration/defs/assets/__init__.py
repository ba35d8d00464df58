"""The assets: the pipeline's steps, the training, curation and new images."""

import contextlib

import dagster as dg

from deepcluster import pipeline
from deepcluster.errors import UserError

GROUP = "deepcluster"
EAGER = dg.AutomationCondition.eager()  # when an input updates: a new data version runs it all


def step_asset(step: str, dep: str, kinds: set[str]):
    """An asset of the graph: a `deepcluster.pipeline` step after `dep`, versioned by its code."""
    return dg.asset(group_name=GROUP, deps=[dep], code_version=pipeline.code_version(step),
                    kinds=kinds, automation_condition=EAGER)  # fmt: skip


@contextlib.contextmanager
def user_errors_fail_plainly():
    """A `UserError` (bad path, parameter, input) fails the step plainly: no retry can fix it."""
    try:
        yield
    except UserError as err:
        raise dg.Failure(description=str(err), allow_retries=False) from err
