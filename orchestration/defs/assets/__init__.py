"""The assets: the pipeline's steps, the training, curation and new images."""

import contextlib

import dagster as dg

from deepcluster.errors import UserError

from ...versions import code_version

GROUP = "deepcluster"
EAGER = dg.AutomationCondition.eager()  # when an input updates: a new data version runs it all


def step_asset(step: str, dep: str, kinds: set[str]):
    """An asset of the graph: a `deepcluster.pipeline` step after `dep`, versioned by its code."""
    return dg.asset(group_name=GROUP, deps=[dep], code_version=code_version(step), kinds=kinds,
                    automation_condition=EAGER)  # fmt: skip


@contextlib.contextmanager
def user_errors_fail_plainly():
    """A `UserError` (bad path, parameter, missing input) fails the step with its message and no
    retry: retrying cannot fix what a person has to."""
    try:
        yield
    except UserError as err:
        raise dg.Failure(description=str(err), allow_retries=False) from err
