"""Asset checks at each hand-off: the manifest by a Great Expectations suite, the arrays by plain
functions tests call. Blocking, but for two warnings: clusters that follow colour, a drifted batch."""

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from deepcluster import drift, health, pipeline
from deepcluster.cluster import size_summary
from deepcluster.errors import UserError

from .. import metadata as md
from .resources import ArtifactStore

Result, WARN = dg.AssetCheckResult, dg.AssetCheckSeverity.WARN
EXPECTATION_COLUMNS = {key: key for key in ("frame", "expectation", "column", "passed", "observed")}
# PIL modes that ingest decodes to RGB: bilevel, grey, palette, colour, high bit depth
PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
             "LAB", "HSV", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"]  # fmt: skip


class ManifestLimits(dg.Config):
    min_images: int = Field(100, description="fewest usable images worth training on")
    max_side: int = Field(20_000, description="largest width or height accepted, px")
    allowed_modes: list[str] = Field(PIL_MODES, description="PIL image modes accepted")
    max_rejected_share: float = Field(0.05, description="largest share of files rejected")


class FeatureLimits(dg.Config):
    min_varying_share: float = Field(0.5, description="least share of dimensions that vary")


class CollapseLimits(dg.Config):
    max_largest_share: float = Field(health.MAX_LARGEST_SHARE, description="in one cluster")
    max_empty_share: float = Field(health.MAX_EMPTY_SHARE, description="of the clusters, empty")


class NormLimits(dg.Config):
    tolerance: float = Field(1e-3, description="allowed distance of each norm from 1")


class DriftLimits(dg.Config):
    max_far_share: float = Field(drift.MAX_FAR_SHARE, description="beyond the training's p99")
    max_js: float = Field(drift.MAX_JS, description="JS divergence (bits) of the cluster sizes")


def verdict(*rules: tuple[bool, str], severity=dg.AssetCheckSeverity.ERROR, **figures) -> Result:
    """Passed when no rule is broken; the description lists the broken ones."""
    broken = [message for is_broken, message in rules if is_broken]
    return Result(passed=not broken, severity=severity, description="; ".join(broken) or None,
                  metadata=figures)  # fmt: skip


def features_result(feats: np.ndarray, rows: int, dim: int, min_varying: float) -> Result:
    """One finite, non-zero embedding per image, `dim` wide, most of its dimensions varying."""
    feats = np.asarray(feats, dtype=np.float32)
    finite = np.isfinite(feats).all(axis=1)
    zero = int((np.linalg.norm(feats[finite], axis=1) <= 1e-6).sum())
    varying = float((feats[finite].std(axis=0) > 1e-6).mean()) if finite.any() else 0.0
    (n, width), bad = feats.shape, int((~finite).sum())
    return verdict(
        (n != rows, f"{n} rows for {rows} images"),
        (width != dim, f"{width} dimensions, the model embeds in {dim}"),
        (bad > 0, f"{bad} rows hold NaN or infinity"),
        (zero > 0, f"{zero} rows are zero vectors"),
        (varying < min_varying, f"{varying:.0%} of the dimensions vary (least {min_varying:.0%})"),
        rows=n, dim=width, expected_rows=rows, expected_dim=dim, non_finite_rows=bad,
        zero_vectors=zero, varying_share=varying,
    )  # fmt: skip


def collapse_result(clusters, rows: int, kmeans: dict, max_largest: float, max_empty: float):
    """One valid cluster id per image; no cluster holds most images and few are empty, as assigned
    and as k-means left them before re-seeding (`kmeans`: k and those figures, from clustering.npz)."""
    k, clusters = kmeans["k"], np.asarray(clusters)
    valid = (clusters >= 0) & (clusters < k)
    kshare, kempty = kmeans["largest_cluster_share_kmeans"], kmeans["empty_clusters_kmeans"]
    sizes = size_summary(clusters[valid], k, kshare, kempty)
    largest, empty = sizes["largest_cluster_share"], sizes["empty_clusters"]
    most, few = f"(at most {max_largest:.0%})", f"(at most {max_empty:.0%} of them)"
    return verdict(
        (len(clusters) != rows, f"{len(clusters)} assignments for {rows} images"),
        (not valid.all(), f"{int((~valid).sum())} cluster ids outside 0..{k - 1}"),
        (largest > max_largest, f"the largest cluster holds {largest:.0%} of the images {most}"),
        (empty > max_empty * k, f"{empty} of {k} clusters are empty {few}"),
        (kshare > max_largest, f"k-means put {kshare:.0%} in one cluster before re-seeding {most}"),
        (kempty > max_empty * k, f"k-means left {kempty} of {k} clusters empty before re-seeding"),
        k=k, largest_cluster_share=largest, empty_clusters=empty,
        largest_cluster_share_kmeans=kshare, empty_clusters_kmeans=kempty,
    )  # fmt: skip


def unit_norm_result(whitened: np.ndarray, tolerance: float) -> Result:
    """The PCA-whitened, L2-normalised embeddings k-means saw have norm 1."""
    norms = np.linalg.norm(whitened, axis=1)
    off = int((~(np.abs(norms - 1) <= tolerance)).sum())  # NaN counts as off
    return verdict((off > 0, f"{off} of {len(norms)} norms are further than {tolerance:g} from 1"),
                   min_norm=float(np.nanmin(norms)), max_norm=float(np.nanmax(norms)))  # fmt: skip


@dg.asset_check(asset="image_manifest", blocking=True)
def manifest_is_valid(config: ManifestLimits, artifacts: ArtifactStore) -> Result:
    """Enough valid, unique images; few rejected."""
    from ..expectations import manifest_outcome  # GX takes seconds to import: only here

    art = artifacts.layout
    manifest, rejected = pl.read_parquet(art.manifest), pl.read_parquet(art.rejected)
    outcome = manifest_outcome(manifest, rejected, config.min_images, config.max_side,
                               config.allowed_modes, config.max_rejected_share)  # fmt: skip
    share = rejected.height / max(manifest.height + rejected.height, 1)
    figures = {"images": manifest.height, "rejected": rejected.height, "rejected_share": share}
    failed = "failed: " + ", ".join(outcome.failed) if outcome.failed else None
    return Result(passed=outcome.passed, description=failed, metadata={
        "expectations": md.table(outcome.rows, EXPECTATION_COLUMNS), **figures})  # fmt: skip


@dg.asset_check(asset="features", blocking=True)
def features_are_sound(config: FeatureLimits, artifacts: ArtifactStore) -> Result:
    """Finite, non-zero, right shape, dimensions vary."""
    feats, rows, dim = pipeline.saved_features(artifacts.layout)
    return features_result(feats, rows, dim, config.min_varying_share)


@dg.asset_check(asset="cluster_assignments", blocking=True)
def no_cluster_collapse(config: CollapseLimits, artifacts: ArtifactStore) -> Result:
    """No collapse: at most half of the images in one cluster and few clusters empty, also before
    re-seeding (which hides it). Blocks the report and registration of a collapsed model."""
    clusters, rows, kmeans = pipeline.saved_clusters(artifacts.layout)
    return collapse_result(clusters, rows, kmeans, config.max_largest_share, config.max_empty_share)


@dg.asset_check(asset="cluster_assignments", blocking=True)
def whitened_features_unit_norm(config: NormLimits, artifacts: ArtifactStore) -> Result:
    """Whitened, L2-normalised features have unit norm."""
    return unit_norm_result(pipeline.whitened_features(artifacts.layout), config.tolerance)


@dg.asset_check(asset="eval_report")
def clusters_follow_content(artifacts: ArtifactStore) -> Result:
    """The clusters follow what the images show, not colour, brightness or size: their shortcut
    score stays below the untrained network's. A warning with what to try (colour may be right)."""
    metrics, params = pipeline.saved_metrics(artifacts.layout)
    figures = {key: round(float(metrics[key]), 4)
               for key in ("shortcut", "shortcut_random_init", "shortcut_pixels")}  # fmt: skip
    return verdict(*((True, problem) for problem in health.shortcut_problems(metrics, params)),
                   severity=WARN, **figures)  # fmt: skip


@dg.asset_check(asset="new_images")
def batch_drift(context: dg.AssetCheckExecutionContext, config: DriftLimits,
                artifacts: ArtifactStore) -> Result:  # fmt: skip
    """Warns when a batch differs from the training: too many images beyond the training's 99th
    percentile distance, or cluster sizes diverging (Jensen-Shannon): where retraining starts."""
    batch = context.op_execution_context.partition_key
    try:
        drift.check_limits(config.max_far_share, config.max_js)
        report = drift.batch_drift(artifacts.layout, batch)
    except UserError as err:
        return Result(passed=False, severity=WARN, description=f"batch {batch}: cannot measure "
                      f"drift: {err}")  # fmt: skip
    problems = report.problems(config.max_far_share, config.max_js)
    said = f"batch {batch} drifted, a place to start retraining: " + "; ".join(problems)
    return Result(passed=not problems, severity=WARN, metadata=report.as_dict(),
                  description=said if problems else f"batch {batch} looks like the training data")
