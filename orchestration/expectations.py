"""The Great Expectations suite of the one data frame handed on: the image manifest (GX 1.x, no
Dagster here). GX has no polars data source, so tables go through `to_pandas()`."""

from collections.abc import Sequence
from dataclasses import dataclass

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
import polars as pl
from great_expectations.data_context.types.base import ProgressBarsConfig

from deepcluster.data import MIN_SIDE


@dataclass
class Outcome:
    """Whether every expectation held; a row per expectation (frame, expectation, column, passed,
    observed) for people to read."""

    passed: bool
    rows: list[dict]

    def __add__(self, other: "Outcome") -> "Outcome":
        return Outcome(self.passed and other.passed, self.rows + other.rows)

    @property
    def failed(self) -> list[str]:
        return [row["expectation"] for row in self.rows if not row["passed"]]


def _observed(result: dict) -> str:
    if "observed_value" in result:
        value = result["observed_value"]
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    if "unexpected_count" in result:
        shown = ", ".join(str(v) for v in (result.get("partial_unexpected_list") or [])[:3])
        return f"{result['unexpected_count']} unexpected" + (f" (e.g. {shown})" if shown else "")
    return ""


def validate(name: str, frame: pd.DataFrame, expectations: Sequence[gxe.Expectation]) -> Outcome:
    """Validate `frame` against `expectations` in a throwaway (ephemeral) GX context."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(name).add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name).get_batch(batch_parameters={"dataframe": frame})
    )  # fmt: skip
    result = batch.validate(gx.ExpectationSuite(name=name, expectations=list(expectations)))
    rows = [{"frame": name, "expectation": r.expectation_config.type,
             "column": r.expectation_config.kwargs.get("column"), "passed": bool(r.success),
             "observed": _observed(r.result)} for r in result.results]  # fmt: skip
    return Outcome(bool(result.success), rows)


def manifest_outcome(
    manifest: pl.DataFrame, rejected: pl.DataFrame, min_images: int, max_side: int,
    allowed_modes: Sequence[str], max_rejected_share: float,
) -> Outcome:  # fmt: skip
    """Enough images, unique content, sizes and modes in range, few files rejected."""
    side = {"min_value": MIN_SIDE, "max_value": max_side}
    table = validate("manifest", manifest.to_pandas(), [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_images),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValuesToBeUnique(column="path"),
        gxe.ExpectColumnValuesToBeBetween(column="width", **side),
        gxe.ExpectColumnValuesToBeBetween(column="height", **side),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(allowed_modes)),
    ])  # fmt: skip
    status = ["accepted"] * manifest.height + ["rejected"] * rejected.height
    shares = validate("files", pd.DataFrame({"status": status}), [
        gxe.ExpectColumnValuesToBeInSet(column="status", value_set=["accepted"],
                                        mostly=1.0 - max_rejected_share),
    ])  # fmt: skip
    return table + shares
