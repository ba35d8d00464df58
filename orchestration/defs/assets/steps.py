"""The asset graph around training: each asset is one call of a `deepcluster.pipeline` step.

Assets return metadata only. Every array and table stays a file under the artifacts root
(`deepcluster.paths.Artifacts`), so nothing large goes through Dagster's pickling IO manager and the
CLI, DVC and Dagster read each other's outputs. The `checkpoint` asset is in `training.py`.
"""

import warnings

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetSpec,
    AutomationCondition,
    BetaWarning,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    TableColumn,
    TableSchema,
    asset,
    multi_asset,
    observable_source_asset,
)

from deepcluster import data, pipeline, tracking
from deepcluster.paths import Artifacts

from ... import metadata as md
from ...config import EvalConfig, IngestConfig, RegisterConfig, experiment_params
from ...errors import user_errors_fail_plainly
from ...versions import code_version, observed_version
from ..resources import ArtifactStore, ComputeResource, MlflowTracking

GROUP = "deepcluster"


with warnings.catch_warnings():  # observable source assets are beta: said once, in the docs
    warnings.simplefilter("ignore", BetaWarning)

    @observable_source_asset(
        group_name=GROUP,
        description="The image folder, as pinned by data.dvc.",
        automation_condition=AutomationCondition.cron_tick_passed("*/5 * * * *"),
    )
    def raw_images(artifacts: ArtifactStore) -> ObserveResult:
        version, source = observed_version(artifacts.dvc_file, artifacts.data_dir)
        return ObserveResult(
            data_version=DataVersion(version),
            metadata={
                "path": MetadataValue.path(artifacts.data_dir),
                "data_version_source": source,
            },
        )


def _schema(frame: pl.DataFrame) -> TableSchema:
    return TableSchema(
        columns=[TableColumn(name, str(kind)) for name, kind in frame.schema.items()]
    )


@multi_asset(
    name="ingest",
    group_name=GROUP,
    specs=[
        AssetSpec(
            "image_manifest",
            deps=[raw_images],
            code_version=code_version("ingest"),
            kinds={"polars"},
            automation_condition=AutomationCondition.eager(),
            description="One row per usable image (path, sha256, size, mode, label); unreadable "
            "files go to `rejected` with the reason.",
        ),
        AssetSpec(
            "image_cache",
            deps=["image_manifest"],
            code_version=code_version("ingest"),
            kinds={"numpy"},
            automation_condition=AutomationCondition.eager(),
            description="Every image decoded once to uint8 (N, 3, R, R), memory-mapped by training.",
        ),
    ],
)
def ingest(config: IngestConfig, artifacts: ArtifactStore, compute: ComputeResource):
    """The ingest step: manifest, rejected files and the decoded cache, as one version."""
    art = artifacts.layout
    params = experiment_params({"data": config.data.model_dump()}, compute.section())
    with user_errors_fail_plainly():
        summary = pipeline.ingest(
            artifacts.data_path, params, art, show=False, dvc_file=artifacts.dvc_file
        )
    manifest = data.read_manifest(art.manifest)
    rejected = pl.read_parquet(art.rejected)
    version = summary.data_version
    yield MaterializeResult(
        asset_key="image_manifest",
        metadata={
            "dagster/row_count": manifest.height,
            "dagster/column_schema": _schema(manifest),
            "rejected": rejected.height,
            "rejected_examples": md.table(rejected.head(20).to_dicts(), {"path": "path", "reason": "reason"}),
            "classes_from_folders": int(manifest["label"].n_unique()) if summary.labelled else 0,
            # lineage: DVC's md5 of the folder as ingested; the sensor compares it with data.dvc's
            "data_version": version.md5,
            "data_version_tracked_by_dvc": version.tracked,
            "path": MetadataValue.path(str(art.manifest)),
        },
    )
    images = data.load_cache(art.cache)
    yield MaterializeResult(
        asset_key="image_cache",
        metadata={
            "shape": str(tuple(images.shape)),
            "resolution": summary.resolution,
            "auto": md.as_json(summary.auto),
            "megabytes": round(images.nbytes / 2**20, 2),
            "path": MetadataValue.path(str(art.cache)),
        },
    )


def _params(compute: ComputeResource, eval_config: EvalConfig | None = None):
    """The caller's part of the parameters: the machine, and the evaluation settings."""
    sections = {"eval": eval_config.model_dump()} if eval_config is not None else {}
    return experiment_params(sections, compute.section())


@asset(
    group_name=GROUP,
    deps=["checkpoint"],
    code_version=code_version("features"),
    kinds={"pytorch", "numpy"},
    automation_condition=AutomationCondition.eager(),
)
def features(artifacts: ArtifactStore, compute: ComputeResource) -> MaterializeResult:
    """Embeddings of every image under the trained model (features.npy, one row per manifest row)."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        feats = pipeline.features(art, _params(compute), show=False)
    return MaterializeResult(
        metadata={
            "dagster/row_count": feats.shape[0],
            "dim": feats.shape[1],
            "mean_norm": float(np.linalg.norm(feats, axis=1).mean()),
            "path": MetadataValue.path(str(art.features)),
        }
    )


@asset(
    group_name=GROUP,
    deps=[features],
    code_version=code_version("cluster"),
    kinds={"faiss", "polars"},
    automation_condition=AutomationCondition.eager(),
)
def cluster_assignments(artifacts: ArtifactStore, compute: ComputeResource) -> MaterializeResult:
    """Image -> cluster and distance (assignments.parquet); whitening + centroids beside it."""
    from deepcluster import evaluate
    from deepcluster.cluster import kmeans_health

    art = artifacts.layout
    with user_errors_fail_plainly():
        table = pipeline.cluster(art, _params(compute))
    health = kmeans_health(art.clustering)
    stats = evaluate.cluster_size_stats(table["cluster"].to_numpy(), health["k"])
    biggest = table.group_by("cluster").len().sort("len", descending=True).head(10)
    return MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            **stats,
            **{key: value for key, value in health.items() if key != "k"},
            "largest_clusters": md.table(biggest.to_dicts(), {"cluster": "cluster", "len": "images"}),
            "path": MetadataValue.path(str(art.assignments)),
        }
    )


BASELINES = (
    "nmi", "ari", "accuracy", "nmi_k", "purity_k", "knn_top1", "linear_top1", "shortcut",
)  # fmt: skip


def comparison(metrics: dict) -> MetadataValue | str:
    """Each figure beside its baselines: what training added, at a glance."""
    rows = [
        {
            "metric": key,
            "trained": metrics[key],
            "random_init": metrics.get(f"{key}_random_init"),
            "pixels": metrics.get(f"{key}_pixels"),
        }
        for key in BASELINES
        if key in metrics
    ]
    if not rows:
        return "no labels: cluster statistics only"
    columns = {"metric": "metric", "trained": "trained", "random_init": "random init",
               "pixels": "raw pixels"}
    return md.table(rows, columns)


def _grid_gallery(art: Artifacts, table: pl.DataFrame, shown: int = 24) -> MetadataValue:
    """The largest clusters' grids inline (the rest are files in eval/grids/)."""
    sizes = table.group_by("cluster").len().sort("len", descending=True).head(shown)
    items = {
        f"cluster {row['cluster']} ({row['len']} images)": art.grid_png(row["cluster"])
        for row in sizes.iter_rows(named=True)
    }
    return md.pictures(items)


@asset(
    group_name=GROUP,
    deps=[cluster_assignments],
    code_version=code_version("evaluate"),
    kinds={"scikitlearn"},
    automation_condition=AutomationCondition.eager(),
)
def eval_report(
    config: EvalConfig, artifacts: ArtifactStore, compute: ComputeResource, mlflow: MlflowTracking
) -> MaterializeResult:
    """Metrics against labels and baselines, training curves, cluster sizes and cluster pictures."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        metrics = pipeline.evaluate_step(art, _params(compute, config), show=False)
    run_id = tracking.run_for(art)
    figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    table = pl.read_parquet(art.assignments)
    return MaterializeResult(
        metadata={
            "metrics": comparison(metrics),
            "pictures": md.pictures(
                {
                    "training curves": art.curves_png,
                    "cluster sizes": art.sizes_png,
                    "clusters": art.overview_png,
                }
            ),
            "cluster_grids": _grid_gallery(art, table),
            "mlflow_run_id": run_id,
            "mlflow_run": MetadataValue.url(mlflow.run_url(run_id)),
            **figures,
            "path": MetadataValue.path(str(art.metrics)),
        }
    )


@asset(
    group_name=GROUP,
    deps=[eval_report],
    code_version=code_version("register"),
    kinds={"mlflow"},
    automation_condition=AutomationCondition.eager(),
)
def registered_model(
    context: AssetExecutionContext,
    config: RegisterConfig,
    artifacts: ArtifactStore,
    mlflow: MlflowTracking,
) -> MaterializeResult:
    """The model as an MLflow pyfunc version of `deepcluster`: alias `candidate`, and `champion`
    when its metric beats the current champion's (the first version is champion)."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        reg = pipeline.register(
            art, metric=config.metric, name=config.name, tags={"dagster_run_id": context.run.run_id}
        )
    context.log.info(reg.summary())
    return MaterializeResult(
        metadata={
            "model_uri": reg.model_uri,
            "version": int(reg.version),
            "aliases": ", ".join(reg.aliases),
            "promoted": reg.promoted,
            "metric": reg.metric,
            "value": reg.value,
            "champion_before": reg.champion_before or "none",
            "champion_value": reg.champion_value,
            "mlflow_run_id": reg.run_id,
            "mlflow_model": MetadataValue.url(mlflow.model_url(reg.name, reg.version)),
            "path": MetadataValue.path(str(art.registration)),
        }
    )
