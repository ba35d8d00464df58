"""Asset checks at each hand-off, backed by the Great Expectations suites in `expectations.py`.

The first four are blocking: a bad manifest makes a garbage cache, broken features make garbage
clusters, and a collapsed or mis-whitened clustering makes a garbage report, curated subset and
registered model. The shortcut check only warns: clusters that follow colour may be what a folder
of stained tissue needs. A failed check's table of expectations says which one failed and what was observed.
Great Expectations is imported inside each check: it takes seconds to import, and only the check
steps need it.
"""

import numpy as np
import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    Config,
    MetadataValue,
    asset_check,
)
from pydantic import Field

from deepcluster import data, drift, evaluate, health
from deepcluster.checkpoint import saved_params
from deepcluster.cluster import kmeans_health, load_clustering
from deepcluster.errors import UserError

from .resources import ArtifactStore

# PIL modes that ingest decodes to RGB: bilevel, grey, palette, colour, high bit depth
PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"]
PIL_MODES += ["LAB", "HSV", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"]


class ManifestLimits(Config):
    min_images: int = Field(100, description="fewest usable images worth training on")
    max_side: int = Field(20_000, description="largest width or height accepted, px")
    allowed_modes: list[str] = Field(PIL_MODES, description="PIL image modes accepted")
    max_rejected_share: float = Field(0.05, description="largest share of files rejected at ingest")


class FeatureLimits(Config):
    min_varying_share: float = Field(0.5, description="smallest share of dimensions with variance")


class CollapseLimits(Config):
    max_largest_share: float = Field(
        health.MAX_LARGEST_SHARE, description="largest share of images in one cluster"
    )
    max_empty_share: float = Field(
        health.MAX_EMPTY_SHARE, description="largest share of the k clusters k-means leaves empty"
    )


class NormLimits(Config):
    tolerance: float = Field(1e-3, description="allowed distance of each norm from 1")


def _result(outcome, **numbers) -> AssetCheckResult:
    return AssetCheckResult(
        passed=outcome.passed,
        severity=AssetCheckSeverity.ERROR,
        description=None if outcome.passed else "failed: " + ", ".join(outcome.failed),
        metadata={"expectations": MetadataValue.md(outcome.markdown()), **numbers},
    )


@asset_check(
    asset="image_manifest", blocking=True, description="Enough valid, unique images; few rejected."
)
def manifest_is_valid(config: ManifestLimits, artifacts: ArtifactStore) -> AssetCheckResult:
    from ..expectations import manifest_outcome

    art = artifacts.layout
    manifest, rejected = data.read_manifest(art.manifest), pl.read_parquet(art.rejected)
    outcome = manifest_outcome(
        manifest,
        rejected,
        config.min_images,
        config.max_side,
        config.allowed_modes,
        config.max_rejected_share,
    )
    share = rejected.height / max(manifest.height + rejected.height, 1)
    return _result(outcome, images=manifest.height, rejected=rejected.height, rejected_share=share)


@asset_check(
    asset="features", blocking=True, description="Finite, non-zero, right shape, dimensions vary."
)
def features_are_sound(config: FeatureLimits, artifacts: ArtifactStore) -> AssetCheckResult:
    from ..expectations import features_outcome

    art = artifacts.layout
    feats = np.load(art.features, mmap_mode="r")
    rows = data.read_manifest(art.manifest).height
    dim = saved_params(art.model).model.embed_dim
    outcome = features_outcome(feats, rows, dim, config.min_varying_share)
    return _result(
        outcome, rows=feats.shape[0], dim=feats.shape[1], expected_rows=rows, expected_dim=dim
    )


@asset_check(
    asset="cluster_assignments",
    blocking=True,
    description="No collapse: k-means put no more than half of the images in one cluster and "
    "left few clusters empty (before re-seeding, which would hide it). Blocks the report and "
    "the registration of a collapsed model.",
)
def no_cluster_collapse(config: CollapseLimits, artifacts: ArtifactStore) -> AssetCheckResult:
    from ..expectations import collapse_outcome

    art = artifacts.layout
    table = pl.read_parquet(art.assignments)
    kmeans = kmeans_health(art.clustering)
    k, rows = kmeans["k"], data.read_manifest(art.manifest).height
    outcome = collapse_outcome(
        table, k, rows, kmeans, config.max_largest_share, config.max_empty_share
    )
    stats = evaluate.cluster_size_stats(table["cluster"].to_numpy(), k)
    return _result(outcome, **stats, **{key: v for key, v in kmeans.items() if key != "k"})


@asset_check(
    asset="cluster_assignments",
    blocking=True,
    description="Whitened, L2-normalised features have unit norm.",
)
def whitened_features_unit_norm(config: NormLimits, artifacts: ArtifactStore) -> AssetCheckResult:
    from ..expectations import unit_norm_outcome

    art = artifacts.layout
    whitening, _ = load_clustering(art.clustering)
    whitened = whitening.apply(np.load(art.features))
    norms = np.linalg.norm(whitened, axis=1)
    outcome = unit_norm_outcome(whitened, config.tolerance)
    return _result(outcome, min_norm=float(norms.min()), max_norm=float(norms.max()))


@asset_check(
    asset="eval_report",
    description="The clusters follow what the images show, not their colour, brightness or size: "
    "their shortcut score (AMI with k-means on those statistics) stays below the untrained "
    "network's. A warning, with what to try: a folder may rightly be sorted by colour.",
)
def clusters_follow_content(artifacts: ArtifactStore) -> AssetCheckResult:
    import json

    metrics = json.loads(artifacts.layout.metrics.read_text())
    problems = health.shortcut_problems(metrics)
    figures = {key: metrics[key] for key in ("shortcut", "shortcut_random_init", "shortcut_pixels")}
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) or None,
        metadata={key: round(float(value), 4) for key, value in figures.items()},
    )


class DriftLimits(Config):
    max_far_share: float = Field(
        drift.MAX_FAR_SHARE, description="largest share of images beyond the training p99 distance"
    )
    max_js: float = Field(
        drift.MAX_JS, description="largest JS divergence (bits) of cluster sizes from training"
    )


DRIFT_DESCRIPTION = (
    "Warns when a batch differs from the training: too many images beyond the training's 99th "
    "percentile distance to their centroid, or cluster sizes diverging from the training's "
    "(Jensen-Shannon). A drifted batch is where retraining starts."
)


@asset_check(asset="new_images", description=DRIFT_DESCRIPTION)
def batch_drift(
    context: AssetCheckExecutionContext, config: DriftLimits, artifacts: ArtifactStore
) -> AssetCheckResult:
    batch = context.op_execution_context.partition_key
    try:
        drift.check_limits(config.max_far_share, config.max_js)
        report = drift.batch_drift(artifacts.layout, batch)
    except UserError as err:
        return _warn(False, f"batch {batch}: cannot measure drift: {err}", {})
    problems = report.problems(config.max_far_share, config.max_js)
    description = (
        f"batch {batch} drifted, a place to start retraining: " + "; ".join(problems)
        if problems
        else f"batch {batch} looks like the training data"
    )
    return _warn(not problems, description, report.as_dict())


def _warn(passed: bool, description: str, figures: dict) -> AssetCheckResult:
    return AssetCheckResult(
        passed=passed, severity=AssetCheckSeverity.WARN, description=description, metadata=figures
    )
