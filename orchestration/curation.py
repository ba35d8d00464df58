"""Beyond training: a curated subset for labelling, new images in batches, and their drift.

- `curated_subset` (after cluster_assignments) runs `deepcluster.curate.curate_step`, shows the
  contact sheets in the UI and logs everything to the model's MLflow run.
- `new_images` has one dynamic partition per batch folder under the inbox (`InboxStore`, env
  DEEPCLUSTER_INBOX); `inbox_sensor` adds the partition and requests its run once a folder has
  settled; the run validates, embeds and assigns the batch with the champion (`deepcluster.inbox`).
- `batch_drift` (severity WARN) compares each batch with the training (`deepcluster.drift`).

`definitions.py` registers these through the lists at the bottom.
"""

from pathlib import Path

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetSelection,
    Config,
    ConfigurableResource,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    asset,
    asset_check,
    define_asset_job,
    sensor,
)
from pydantic import Field

from deepcluster import curate, dedup, drift, inbox, pipeline, tracking
from deepcluster.errors import UserError

from . import metadata as md
from .assets import GROUP, cluster_assignments, registered_model
from .config import ROOT
from .errors import user_errors_fail_plainly
from .resources import ArtifactStore, MlflowTracking, from_env
from .versions import code_version

SHEETS_SHOWN = 12  # contact sheets embedded in the UI; all of them go to MLflow

inbox_batches = DynamicPartitionsDefinition(name="inbox_batches")


class InboxStore(ConfigurableResource):
    """The folder new batches arrive in (one sub-folder each) and the model that assigns them."""

    folder: str = Field(str(ROOT / "inbox"), description="inbox folder; env DEEPCLUSTER_INBOX")
    settle_seconds: float = Field(
        30.0, description="a batch folder counts once nothing in it changed for this long"
    )
    model_uri: str = Field(inbox.DEFAULT_MODEL, description="the registered model that assigns")

    @classmethod
    def from_env(cls) -> "InboxStore":
        return cls(**from_env(folder="DEEPCLUSTER_INBOX"))


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
    deps=[cluster_assignments],
    code_version=code_version("curate"),
    kinds={"faiss", "polars"},
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
    deps=[registered_model],
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


@asset_check(asset=new_images, description=DRIFT_DESCRIPTION)
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


new_images_job = define_asset_job(
    "new_images_job",
    selection=AssetSelection.assets(new_images),
    description="Assign one inbox batch with the champion and check it for drift.",
)


@sensor(
    job=new_images_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.STOPPED,
    description="Adds a new_images partition and requests its run for each settled inbox folder.",
)
def inbox_sensor(context: SensorEvaluationContext, inbox_store: InboxStore) -> SensorResult:
    try:
        batches = inbox.list_batches(Path(inbox_store.folder), inbox_store.settle_seconds)
    except inbox.InboxError as err:
        return SensorResult(skip_reason=str(err))
    if batches.invalid:
        context.log.warning(f"folder names that cannot be batch names: {batches.invalid}")
    known = set(context.instance.get_dynamic_partitions(inbox_batches.name))
    new = [name for name in batches.ready if name not in known]
    if not new:
        waiting = f"; still settling: {', '.join(batches.waiting)}" if batches.waiting else ""
        return SensorResult(skip_reason=f"no new batch in {inbox_store.folder}{waiting}")
    return SensorResult(
        run_requests=[RunRequest(run_key=name, partition_key=name) for name in new],
        dynamic_partitions_requests=[inbox_batches.build_add_request(new)],
    )


# what definitions.py registers
CURATION_ASSETS = [curated_subset, new_images]
CURATION_CHECKS = [batch_drift]
CURATION_JOBS = [new_images_job]
CURATION_SENSORS = [inbox_sensor]
CURATION_RESOURCES = {"inbox_store": InboxStore.from_env()}
