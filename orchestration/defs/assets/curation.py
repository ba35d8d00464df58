"""After training: a curated subset for labelling, and new images assigned in batches (one dynamic
partition per inbox folder, added by `inbox_sensor`; `batch_drift` checks each)."""

from pathlib import Path

import dagster as dg

from deepcluster import pipeline
from deepcluster.paths import cluster_pngs

from ... import metadata as md
from ...config import CurateConfig, experiment_params
from ..resources import ArtifactStore, InboxStore, MlflowTracking
from . import GROUP, step_asset, user_errors_fail_plainly

SHEETS_SHOWN = 12  # contact sheets embedded in the UI; all of them go to MLflow
SUBSET = {"path": "path", "cluster": "cluster", "bin": "bin", "reason": "reason"}
DUPLICATES = {"path": "dropped", "twin": "kept twin", "similarity": "cosine", "kind": "kind"}

inbox_batches = dg.DynamicPartitionsDefinition(name="inbox_batches")


def _sheets(folder: Path, shown: int) -> dg.MetadataValue:
    """The first `shown` contact sheets inline (a page of hundreds would not load)."""
    files = cluster_pngs(folder)
    parts = [f"{min(shown, len(files))} of {len(files)} clusters; all in MLflow and {folder}"]
    parts += [md.picture(path, path.stem.replace("_", " ")) for path in files[:shown]]
    return dg.MetadataValue.md("\n\n".join(parts))


@step_asset("curate", "cluster_assignments", {"faiss", "polars"})
def curated_subset(config: CurateConfig, artifacts: ArtifactStore,
                   mlflow: MlflowTracking) -> dg.MaterializeResult:  # fmt: skip
    """A diverse, balanced sample per cluster for labelling (DeepCluster++ bins by default),
    after removing exact and near duplicates; a contact sheet per cluster."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        result = pipeline.curate(art, experiment_params({"curate": config.model_dump()}).curate)
    run_id = pipeline.model_run(art)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": result.subset.height,
        **{k: v for k, v in result.summary.items() if isinstance(v, (int, float, str))},
        "first_rows": md.table(result.subset.head(10).to_dicts(), SUBSET),
        "duplicates": md.table(result.duplicates.head(10).to_dicts(), DUPLICATES),
        "contact_sheets": _sheets(art.contact_sheets, SHEETS_SHOWN),
        "mlflow_run_id": run_id, "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        "path": dg.MetadataValue.path(str(art.curated_subset)),
    })  # fmt: skip


@dg.asset(group_name=GROUP, deps=["registered_model"], partitions_def=inbox_batches,
          code_version=pipeline.code_version("assign"), kinds={"mlflow", "polars"})
def new_images(context: dg.AssetExecutionContext, artifacts: ArtifactStore,
               inbox_store: InboxStore, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """One inbox batch: validated as at ingest, embedded and assigned to the learned clusters by
    the champion; artifacts/inbox/<batch>/assignments.parquet."""
    batch, art = context.partition_key, artifacts.layout
    with user_errors_fail_plainly():
        loaded, result = pipeline.assign_batch(art, Path(inbox_store.folder) / batch, batch,
                                               inbox_store.model_uri)  # fmt: skip
    context.log.info(f"batch {batch}: {result.table.height} images assigned by {loaded.uri}")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": result.table.height, "rejected": result.rejected.height,
        "model_uri": loaded.uri, "model_version": loaded.version or "unversioned",
        "largest_clusters": md.table(md.largest_clusters(result.table, 5).to_dicts(), md.SIZES),
        "path": dg.MetadataValue.path(str(art.batch_assignments(batch))),
    })  # fmt: skip
