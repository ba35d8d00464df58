"""Beyond training: a curated subset for labelling, new images in batches, and their drift.

- `curated_subset` (after cluster_assignments) runs `deepcluster.curate.curate_step`, shows the
  contact sheets in the UI and logs everything to the model's MLflow run.
- `new_images` has one dynamic partition per batch folder under the inbox (`InboxStore`, env
  DEEPCLUSTER_INBOX); `inbox_sensor` adds the partition and requests its run once a folder has
  settled; the run validates, embeds and assigns the batch with the champion (`deepcluster.inbox`).
- `batch_drift` (severity WARN) compares each batch with the training (`deepcluster.drift`).
"""

from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    Config,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from deepcluster import curate, dedup, pipeline, tracking

from ... import metadata as md
from ...errors import user_errors_fail_plainly
from ...versions import code_version
from ..resources import ArtifactStore, InboxStore, MlflowTracking
from .steps import GROUP

SHEETS_SHOWN = 12  # contact sheets embedded in the UI; all of them go to MLflow

inbox_batches = DynamicPartitionsDefinition(name="inbox_batches")


# --- curated subset -------------------------------------------------------------------------------


class CurateConfig(Config):
    budget: int = Field(200, description="images to choose")
    method: str = Field("bins", description="bins (DeepCluster++) | hierarchical (Vo et al.)")
    bins: int = Field(4, description="equal-frequency distance bins per cluster")
    eps: float = Field(dedup.DEFAULT_EPS, description="near duplicates: cosine above 1 - eps")
    parents: int | None = Field(None, description="hierarchical: parent groups (sqrt(k) if null)")
    seed: int = Field(0, description="random draws within bins and clusters")


_SUBSET_COLUMNS = {"path": "path", "cluster": "cluster", "bin": "bin", "reason": "reason"}
_DUPLICATE_COLUMNS = {
    "path": "dropped",
    "twin": "kept twin",
    "similarity": "cosine",
    "kind": "kind",
}


def _sheets(sheets_dir: Path, shown: int) -> MetadataValue:
    """The first `shown` contact sheets inline (a page of hundreds would not load)."""
    files = sorted(sheets_dir.glob("cluster_*.png"))
    parts = [f"{min(shown, len(files))} of {len(files)} clusters; all in MLflow and {sheets_dir}"]
    parts += [md.picture(path, path.stem.replace("_", " ")) for path in files[:shown]]
    return MetadataValue.md("\n\n".join(parts))


@asset(
    group_name=GROUP,
    deps=["cluster_assignments"],
    code_version=code_version("curate"),
    kinds={"faiss", "polars"},
    automation_condition=AutomationCondition.eager(),
)
def curated_subset(
    config: CurateConfig, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> MaterializeResult:
    """A diverse, balanced sample per cluster for labelling (DeepCluster++ bins by default),
    after removing exact and near duplicates; a contact sheet per cluster."""
    art = artifacts.layout
    with user_errors_fail_plainly():
        result = pipeline.curate(art, curate.Settings(**config.model_dump()))
    run_id = tracking.run_for(art)
    return MaterializeResult(
        metadata={
            "dagster/row_count": result.subset.height,
            **{k: v for k, v in result.summary.items() if isinstance(v, (int, float, str))},
            "first_rows": md.table(result.subset.head(10).to_dicts(), _SUBSET_COLUMNS),
            "duplicates": md.table(result.duplicates.head(10).to_dicts(), _DUPLICATE_COLUMNS),
            "contact_sheets": _sheets(art.contact_sheets, SHEETS_SHOWN),
            "mlflow_run_id": run_id,
            "mlflow_run": MetadataValue.url(mlflow.run_url(run_id)),
            "path": MetadataValue.path(str(art.curated_subset)),
        }
    )


# --- new images -----------------------------------------------------------------------------------


@asset(
    group_name=GROUP,
    deps=["registered_model"],
    partitions_def=inbox_batches,
    code_version=code_version("assign"),
    kinds={"mlflow", "polars"},
)
def new_images(
    context: AssetExecutionContext,
    artifacts: ArtifactStore,
    inbox_store: InboxStore,
    mlflow: MlflowTracking,
) -> MaterializeResult:
    """One inbox batch: validated as at ingest, embedded and assigned to the learned clusters by
    the champion; artifacts/inbox/<batch>/assignments.parquet."""
    batch = context.partition_key
    art = artifacts.layout
    with user_errors_fail_plainly():
        loaded, result = pipeline.assign_batch(
            art, Path(inbox_store.folder) / batch, batch, inbox_store.model_uri
        )
    context.log.info(f"batch {batch}: {result.table.height} images assigned by {loaded.uri}")
    sizes = result.table.group_by("cluster").len().sort("len", descending=True).head(5)
    return MaterializeResult(
        metadata={
            "dagster/row_count": result.table.height,
            "rejected": result.rejected.height,
            "model_uri": loaded.uri,
            "model_version": loaded.version or "unversioned",
            "largest_clusters": md.table(sizes.to_dicts(), {"cluster": "cluster", "len": "images"}),
            "path": MetadataValue.path(str(art.batch_assignments(batch))),
        }
    )
