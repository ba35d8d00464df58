"""Great Expectations suites for what each step hands to the next (GX 1.x; no Dagster here).

Each function builds small pandas frames from the pipeline's files (GX 1.x has no polars data
source, so polars tables go through `to_pandas()`), validates them in an ephemeral GX context and
returns an `Outcome`. `checks.py` turns outcomes into Dagster asset check results; tests call these
functions directly on crafted tables.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import polars as pl
from great_expectations.data_context.types.base import ProgressBarsConfig

from deepcluster.data import MIN_SIDE


@dataclass
class Outcome:
    """Whether every expectation held, with one row per expectation for people to read."""

    passed: bool
    rows: list[dict] = field(default_factory=list)

    def __add__(self, other: "Outcome") -> "Outcome":
        return Outcome(self.passed and other.passed, self.rows + other.rows)

    @property
    def failed(self) -> list[str]:
        return [row["expectation"] for row in self.rows if not row["passed"]]

    def markdown(self) -> str:
        lines = [
            "| frame | expectation | column | passed | observed |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            cells = [
                row["frame"],
                row["expectation"],
                row["column"] or "",
                "yes" if row["passed"] else "**NO**",
                row["observed"],
            ]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)


def _observed(result: dict) -> str:
    if "observed_value" in result:
        value = result["observed_value"]
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    if "unexpected_count" in result:
        examples = result.get("partial_unexpected_list") or []
        shown = ", ".join(str(v) for v in examples[:3])
        return f"{result['unexpected_count']} unexpected" + (f" (e.g. {shown})" if shown else "")
    return ""


def validate(name: str, frame: pd.DataFrame, expectations: Sequence[gxe.Expectation]) -> Outcome:
    """Validate `frame` against `expectations` in a throwaway (ephemeral) GX context."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(gx.ExpectationSuite(name=name, expectations=list(expectations)))
    rows = [
        {
            "frame": name,
            "expectation": r.expectation_config.type,
            "column": r.expectation_config.kwargs.get("column"),
            "passed": bool(r.success),
            "observed": _observed(r.result),
        }
        for r in result.results
    ]
    return Outcome(bool(result.success), rows)


def manifest_outcome(
    manifest: pl.DataFrame,
    rejected: pl.DataFrame,
    min_images: int,
    max_side: int,
    allowed_modes: Sequence[str],
    max_rejected_share: float,
) -> Outcome:
    """Enough images, unique content, sizes and modes in range, few files rejected."""
    table = validate(
        "manifest",
        manifest.to_pandas(),
        [
            gxe.ExpectTableRowCountToBeBetween(min_value=min_images),
            gxe.ExpectColumnValuesToBeUnique(column="sha256"),
            gxe.ExpectColumnValuesToBeUnique(column="path"),
            gxe.ExpectColumnValuesToBeBetween(
                column="width", min_value=MIN_SIDE, max_value=max_side
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="height", min_value=MIN_SIDE, max_value=max_side
            ),
            gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(allowed_modes)),
        ],
    )
    files = pd.DataFrame(
        {"status": ["accepted"] * manifest.height + ["rejected"] * rejected.height}
    )
    shares = validate(
        "files",
        files,
        [
            gxe.ExpectColumnValuesToBeInSet(
                column="status", value_set=["accepted"], mostly=1.0 - max_rejected_share
            )
        ],
    )
    return table + shares


def features_outcome(
    features: np.ndarray, rows: int, dim: int, min_varying_share: float
) -> Outcome:
    """Finite, non-zero embeddings of the right shape whose dimensions actually vary."""
    features = np.asarray(features, dtype=np.float32)
    per_image = pd.DataFrame(
        {"finite": np.isfinite(features).all(axis=1), "norm": np.linalg.norm(features, axis=1)}
    )
    per_dim = pd.DataFrame({"std": features.std(axis=0)})
    return validate(
        "features",
        per_image,
        [
            gxe.ExpectTableRowCountToEqual(value=rows),
            gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
            gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=1e-6, strict_min=True),
        ],
    ) + validate(
        "feature_dimensions",
        per_dim,
        [
            gxe.ExpectTableRowCountToEqual(value=dim),
            gxe.ExpectColumnValuesToBeBetween(
                column="std", min_value=1e-6, mostly=min_varying_share
            ),
        ],
    )


def cluster_sizes(assignments: np.ndarray, k: int) -> pd.DataFrame:
    sizes = np.bincount(np.asarray(assignments, dtype=np.int64), minlength=k)
    return pd.DataFrame(
        {"cluster": np.arange(len(sizes)), "size": sizes, "share": sizes / sizes.sum()}
    )


def collapse_outcome(
    table: pl.DataFrame,
    k: int,
    rows: int,
    kmeans: dict,
    max_largest_share: float,
    max_empty_share: float,
) -> Outcome:
    """Every image has a valid cluster; no cluster swallows the data, neither in the final
    assignments nor as k-means left them before empty clusters were re-seeded."""
    assignments = validate(
        "assignments",
        table.select("cluster", "distance").to_pandas(),
        [
            gxe.ExpectTableRowCountToEqual(value=rows),
            gxe.ExpectColumnValuesToNotBeNull(column="cluster"),
            gxe.ExpectColumnValuesToBeBetween(column="cluster", min_value=0, max_value=k - 1),
        ],
    )
    sizes = validate(
        "cluster_sizes",
        cluster_sizes(table["cluster"].to_numpy(), k),
        [
            gxe.ExpectColumnMaxToBeBetween(column="share", max_value=max_largest_share),
            # `mostly`: the share of clusters that must hold at least one image
            gxe.ExpectColumnValuesToBeBetween(
                column="size", min_value=1, mostly=1.0 - max_empty_share
            ),
        ],
    )
    raw = pd.DataFrame(
        {
            "largest_share": [kmeans["largest_cluster_share_kmeans"]],
            "empty_share": [kmeans["empty_clusters_kmeans"] / k],
        }
    )
    before_reseeding = validate(
        "kmeans_before_reseeding",
        raw,
        [
            gxe.ExpectColumnMaxToBeBetween(column="largest_share", max_value=max_largest_share),
            gxe.ExpectColumnMaxToBeBetween(column="empty_share", max_value=max_empty_share),
        ],
    )
    return assignments + sizes + before_reseeding


def unit_norm_outcome(whitened: np.ndarray, tolerance: float) -> Outcome:
    """The PCA-whitened, L2-normalised embeddings k-means saw have unit norm."""
    norms = pd.DataFrame({"whitened_norm": np.linalg.norm(whitened, axis=1)})
    return validate(
        "whitened_features",
        norms,
        [
            gxe.ExpectColumnValuesToNotBeNull(column="whitened_norm"),
            gxe.ExpectColumnValuesToBeBetween(
                column="whitened_norm", min_value=1 - tolerance, max_value=1 + tolerance
            ),
        ],
    )
