"""The asset graph around training: thin wrappers over `deepcluster`, writing the CLI's files.

Assets return metadata only. Every array and table stays a file under the artifacts root
(`deepcluster.paths.Artifacts`), so nothing large goes through Dagster's pickling IO manager and the
CLI, DVC and Dagster read each other's outputs. The `checkpoint` asset lives in `training.py`.
"""

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    TableColumn,
    TableSchema,
    asset,
    observable_source_asset,
)

from deepcluster import (
    cluster,
    data,
    evaluate,
    lineage,
    models,
    pipeline,
    plots,
    registry,
    tracking,
    train,
)
from deepcluster.config import Params, params_from_dict
from deepcluster.paths import Artifacts

from . import metadata as md
from .config import EvalConfig, IngestConfig, RegisterConfig
from .errors import user_errors_fail_plainly
from .resources import ArtifactStore, ComputeResource, MlflowTracking
from .training import checkpoint
from .versions import code_version, observed_version

GROUP = "deepcluster"


@observable_source_asset(group_name=GROUP, description="The image folder, as pinned by data.dvc.")
def raw_images(artifacts: ArtifactStore) -> ObserveResult:
    version, source = observed_version(artifacts.dvc_file, artifacts.data_dir)
    return ObserveResult(
        data_version=DataVersion(version),
        metadata={"path": MetadataValue.path(artifacts.data_dir), "data_version_source": source},
    )


def _rejected_examples(rejected: pl.DataFrame, shown: int = 10) -> str:
    if rejected.is_empty():
        return "no file was rejected"
    table = md.markdown_table(rejected.head(shown).to_dicts(), {"path": "path", "reason": "reason"})
    more = rejected.height - shown
    return table + (f"\n\n… and {more} more in rejected.parquet" if more > 0 else "")


def _schema(frame: pl.DataFrame) -> TableSchema:
    return TableSchema(
        columns=[TableColumn(name, str(kind)) for name, kind in frame.schema.items()]
    )


@asset(
    group_name=GROUP,
    deps=[raw_images],
    code_version=code_version(data),
    kinds={"polars"},
)
def image_manifest(artifacts: ArtifactStore, compute: ComputeResource) -> MaterializeResult:
    """One row per usable image (path, sha256, size, mode, label); unreadable files go to `rejected`."""
    art, folder = artifacts.layout, artifacts.data_path
    with user_errors_fail_plainly():
        manifest, rejected = data.scan_images(folder, compute.workers)
        data.require_images(manifest, rejected, folder)
    data.write_tables(manifest, rejected, art.ingest_dir)
    labels = pipeline.labels_of(manifest)
    version = lineage.data_version(art.manifest, folder, artifacts.dvc_file)
    return MaterializeResult(
        metadata={
            "dagster/row_count": manifest.height,
            "dagster/column_schema": _schema(manifest),
            "rejected": rejected.height,
            "rejected_examples": MetadataValue.md(_rejected_examples(rejected)),
            "classes_from_folders": 0 if labels is None else len(set(labels)),
            # lineage: DVC's md5 of the folder as ingested; the sensor compares it with data.dvc's
            "data_version": version.md5,
            "data_version_tracked_by_dvc": version.tracked,
            "path": MetadataValue.path(str(art.manifest)),
        }
    )


@asset(
    group_name=GROUP,
    deps=[image_manifest],
    code_version=code_version(data),
    kinds={"numpy"},
)
def image_cache(
    config: IngestConfig, artifacts: ArtifactStore, compute: ComputeResource
) -> MaterializeResult:
    """Every image decoded once to uint8 (N, 3, R, R), memory-mapped by training."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        manifest = data.read_manifest(art.manifest)
        data.build_cache(
            artifacts.data_path, manifest, config.resolution, art.cache, compute.workers
        )
    images = data.load_cache(art.cache)
    return MaterializeResult(
        metadata={
            "shape": str(tuple(images.shape)),
            "resolution": config.resolution,
            "megabytes": round(images.nbytes / 2**20, 2),
            "path": MetadataValue.path(str(art.cache)),
        }
    )


def trained_params(
    art: Artifacts, compute: ComputeResource, eval_config: EvalConfig | None = None
) -> Params:
    """The parameters the model was trained with (in model.pt), so later steps cannot disagree."""
    with user_errors_fail_plainly():
        raw = train.saved_params(pipeline.require(art.model, "train")).to_dict()
    raw["train"]["device"] = compute.device
    if eval_config is not None:
        raw["eval"] = eval_config.model_dump()
    return params_from_dict(raw)


@asset(
    group_name=GROUP,
    deps=[checkpoint],
    code_version=code_version(pipeline, train, models),
    kinds={"pytorch", "numpy"},
)
def features(artifacts: ArtifactStore, compute: ComputeResource) -> MaterializeResult:
    """Embeddings of every image under the trained model (features.npy, one row per manifest row)."""
    art = artifacts.layout
    params = trained_params(art, compute)
    with user_errors_fail_plainly():
        feats = pipeline.features_step(params, art, progress=False)
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
    code_version=code_version(pipeline, cluster),
    kinds={"faiss", "polars"},
)
def cluster_assignments(artifacts: ArtifactStore, compute: ComputeResource) -> MaterializeResult:
    """Image -> cluster and distance (assignments.parquet); whitening + centroids beside it."""
    art = artifacts.layout
    params = trained_params(art, compute)
    with user_errors_fail_plainly():
        table = pipeline.cluster_step(params, art)
    stats = evaluate.cluster_size_stats(table["cluster"].to_numpy(), params.cluster.k)
    biggest = table.group_by("cluster").len().sort("len", descending=True).head(5)
    return MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            **stats,
            "largest_clusters": MetadataValue.md(
                md.markdown_table(biggest.to_dicts(), {"cluster": "cluster", "len": "images"})
            ),
            "path": MetadataValue.path(str(art.assignments)),
        }
    )


BASELINES = ("nmi", "ari", "accuracy", "nmi_k", "knn_top1", "linear_top1")


def _metrics_table(metrics: dict) -> str:
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
    columns = {
        "metric": "metric",
        "trained": "trained",
        "random_init": "random init",
        "pixels": "raw pixels",
    }
    return md.markdown_table(rows, columns) if rows else "no labels: cluster statistics only"


@asset(
    group_name=GROUP,
    deps=[cluster_assignments],
    code_version=code_version(pipeline, evaluate, plots),
    kinds={"scikitlearn"},
)
def eval_report(
    config: EvalConfig, artifacts: ArtifactStore, compute: ComputeResource, mlflow: MlflowTracking
) -> MaterializeResult:
    """Metrics against labels and baselines, training curves, cluster sizes and cluster pictures."""
    art = artifacts.layout
    params = trained_params(art, compute, config)
    with user_errors_fail_plainly():
        metrics = pipeline.evaluate_step(params, art, progress=False)
    run_id = tracking.run_for(art)
    tracking.log_evaluation(run_id, metrics, art.eval_dir)
    figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return MaterializeResult(
        metadata={
            **figures,
            "mlflow_run_id": run_id,
            "mlflow_run": MetadataValue.url(mlflow.run_url(run_id)),
            "metrics": MetadataValue.md(_metrics_table(metrics)),
            "pictures": md.pictures(
                {
                    "training curves": art.eval_dir / "curves.png",
                    "cluster sizes": art.eval_dir / "cluster_sizes.png",
                    "clusters": art.eval_dir / "clusters.png",
                }
            ),
            "path": MetadataValue.path(str(art.metrics)),
        }
    )


@asset(
    group_name=GROUP,
    deps=[eval_report],
    code_version=code_version(registry),
    kinds={"mlflow"},
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
        reg = registry.register_model(
            art, metric=config.metric, name=config.name, tags={"dagster_run_id": context.run.run_id}
        )
    registry.write_registration(reg, registry.registration_path(art))
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
            "path": MetadataValue.path(str(registry.registration_path(art))),
        }
    )
