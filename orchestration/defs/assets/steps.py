"""The pipeline's assets, each one `deepcluster.pipeline` step, returning metadata only: arrays and
tables stay files under the artifacts root, where the CLI and DVC read and write them too."""

import warnings

import dagster as dg
import numpy as np
import polars as pl

from deepcluster import figures, pipeline

from ... import metadata as md
from ...config import EvalConfig, IngestConfig, RegisterConfig, experiment_params
from ..resources import ArtifactStore, ComputeResource, MlflowTracking
from . import EAGER, GROUP, step_asset, user_errors_fail_plainly

GRIDS = 24  # the largest clusters' grids inline; the rest are files in eval/grids/
md_path = dg.MetadataValue.path

with warnings.catch_warnings():  # observable source assets are beta: said once, in the docs
    warnings.simplefilter("ignore", dg.BetaWarning)

    @dg.observable_source_asset(
        group_name=GROUP,  # observed every five minutes while data_version_sensor is on
        automation_condition=dg.AutomationCondition.cron_tick_passed("*/5 * * * *"),
    )
    def raw_images(artifacts: ArtifactStore) -> dg.ObserveResult:
        """The image folder, as pinned by data.dvc."""
        version, source = pipeline.observed_data_version(artifacts.data_dir, artifacts.dvc_file)
        return dg.ObserveResult(data_version=dg.DataVersion(version), metadata={
            "path": md_path(artifacts.data_dir), "data_version_source": source})  # fmt: skip


def _spec(key: str, dep: str, kind: str, description: str) -> dg.AssetSpec:
    return dg.AssetSpec(key, deps=[dep], code_version=pipeline.code_version("ingest"),
                        kinds={kind}, automation_condition=EAGER, description=description)  # fmt: skip


@dg.multi_asset(name="ingest", group_name=GROUP, specs=[
    _spec("image_manifest", "raw_images", "polars", "One row per usable image (path, sha256, "
          "size, mode, label); unreadable files go to `rejected` with the reason."),
    _spec("image_cache", "image_manifest", "numpy",
          "Every image decoded once to uint8 (N, 3, R, R), memory-mapped by training."),
])  # fmt: skip
def ingest(config: IngestConfig, artifacts: ArtifactStore, compute: ComputeResource):
    """The ingest step: manifest, rejected files and the decoded cache, published as one set."""
    art = artifacts.layout
    params = experiment_params({"data": config.data.model_dump()}, compute.section())
    with user_errors_fail_plainly():
        summary = pipeline.ingest(artifacts.data_dir, params, art, show=False,
                                  dvc_file=artifacts.dvc_file)  # fmt: skip
    rejected = md.table(summary.rejected_examples, {"path": "path", "reason": "reason"})
    yield dg.MaterializeResult(asset_key="image_manifest", metadata={
        "dagster/row_count": summary.images, "dagster/column_schema": md.schema(summary.columns),
        "rejected": summary.rejected, "rejected_examples": rejected,
        "classes_from_folders": summary.classes,
        # lineage: DVC's md5 of the folder as ingested, and whether data.dvc pins it
        "data_version": summary.data_version.md5,
        "data_version_tracked_by_dvc": summary.data_version.tracked,
        "path": md_path(str(art.manifest)),
    })  # fmt: skip
    yield dg.MaterializeResult(asset_key="image_cache", metadata={
        "shape": str(summary.cache_shape), "resolution": summary.resolution,
        "auto": md.as_json(summary.auto), "megabytes": summary.cache_megabytes,
        "path": md_path(str(art.cache)),
    })  # fmt: skip


def _params(compute: ComputeResource, eval_config: EvalConfig | None = None):
    """The caller's part of the parameters: the machine, and the evaluation settings."""
    sections = {"eval": eval_config.model_dump()} if eval_config is not None else {}
    return experiment_params(sections, compute.section())


@step_asset("features", "checkpoint", {"pytorch", "numpy"})
def features(artifacts: ArtifactStore, compute: ComputeResource) -> dg.MaterializeResult:
    """Embeddings of every image under the trained model (features.npy, a row per manifest row)."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        feats = pipeline.features(art, _params(compute), show=False)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": feats.shape[0], "dim": feats.shape[1],
        "mean_norm": round(float(np.linalg.norm(feats, axis=1).mean()), 4), "path": md_path(str(art.features)),
    })  # fmt: skip


@step_asset("cluster", "features", {"faiss", "polars"})
def cluster_assignments(artifacts: ArtifactStore, compute: ComputeResource) -> dg.MaterializeResult:
    """Image -> cluster and distance (assignments.parquet); whitening + centroids beside it."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        summary = pipeline.cluster(art, _params(compute))
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary.table.height, **md.figures(summary.sizes),
        "largest_clusters": md.table(md.largest_clusters(summary.table, 10).to_dicts(), md.SIZES),
        "path": md_path(str(art.assignments)),
    })  # fmt: skip


@step_asset("evaluate", "cluster_assignments", {"scikitlearn"})
def eval_report(config: EvalConfig, artifacts: ArtifactStore, compute: ComputeResource,
                mlflow: MlflowTracking) -> dg.MaterializeResult:  # fmt: skip
    """Metrics against labels and baselines, training curves, cluster sizes and cluster pictures."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        metrics = pipeline.evaluate_step(art, _params(compute, config), show=False)
    run_id = pipeline.model_run(art)
    rows = figures.beside_baselines(metrics)
    largest = md.largest_clusters(pl.read_parquet(art.assignments, columns=["cluster"]), GRIDS)
    return dg.MaterializeResult(metadata={
        "metrics": md.table(rows, md.BESIDE_BASELINES) if rows else "no labels: no probes",
        "pictures": md.pictures({"training curves": art.curves_png,
                                 "cluster sizes": art.sizes_png, "clusters": art.overview_png}),
        "cluster_grids": md.pictures({f"cluster {c} ({n} images)": art.grid_png(c)
                                      for c, n in largest.iter_rows()}),
        "mlflow_run_id": run_id, "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        **md.figures(metrics),
        **{key: metrics[key] for key in ("training_collapse",) if key in metrics},
        "path": md_path(str(art.metrics)),
    })  # fmt: skip


@step_asset("register", "eval_report", {"mlflow"})
def registered_model(context: dg.AssetExecutionContext, config: RegisterConfig,
                     artifacts: ArtifactStore, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """The model as an MLflow pyfunc version of `deepcluster`: alias `candidate`, and `champion`
    when it beats the untrained network and raw pixels and its metric beats the current
    champion's (the first such version is champion); `reason` says why or why not."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        reg = pipeline.register(art, metric=config.metric, name=config.name,
                                tags={"dagster_run_id": context.run.run_id})  # fmt: skip
    context.log.info(reg.summary())
    return dg.MaterializeResult(metadata={
        "model_uri": reg.model_uri, "version": int(reg.version), "aliases": ", ".join(reg.aliases),
        "promoted": reg.promoted, "reason": reg.reason, "metric": reg.metric,
        "champion_before": reg.champion_before or "none",
        **md.figures({"value": reg.value, "champion_value": reg.champion_value}),
        "mlflow_run_id": reg.run_id,
        "mlflow_model": dg.MetadataValue.url(mlflow.model_url(reg.name, reg.version)),
        "path": md_path(str(art.registration)),
    })  # fmt: skip
