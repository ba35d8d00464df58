"""The job that materialises the whole graph, and the sensor that runs it on a new data version."""

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from .resources import ArtifactStore
from .versions import dvc_md5

# An AssetSelection object rather than a selection string: strings need the antlr4 runtime, whose
# version DVC pins differently (DVC lives in its own virtual environment here for that reason).
# new_images is left out: its runs are one inbox batch each (a partition), see curation.py.
deepcluster_job = define_asset_job(
    "deepcluster_job",
    selection=AssetSelection.all() - AssetSelection.assets("new_images"),
    description="Every asset and check, from the image folder to the evaluation report.",
)

# Records raw_images' data version (DVC md5), from which Dagster tells which assets are stale.
observe_data_job = define_asset_job(
    "observe_data", selection=AssetSelection.assets("raw_images"), description="Observe data/."
)


def last_materialised_md5(context: SensorEvaluationContext) -> str | None:
    """The data version the image manifest was last built from (recorded in its metadata)."""
    event = context.instance.get_latest_materialization_event(AssetKey("image_manifest"))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("data_version")
    return None if value is None else str(value.value)


@sensor(
    job=deepcluster_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description="Runs deepcluster_job when data.dvc pins a new md5 (cursor: the last md5 seen).",
)
def data_version_sensor(context: SensorEvaluationContext, artifacts: ArtifactStore) -> SensorResult:
    md5 = dvc_md5(artifacts.dvc_file)
    if md5 is None:
        return SensorResult(skip_reason=f"no DVC pointer at {artifacts.dvc_file}")
    if md5 == context.cursor:
        return SensorResult(skip_reason=f"data version {md5} unchanged")
    if context.cursor is None and md5 == last_materialised_md5(context):
        # first tick after the sensor is switched on: the graph is already on this version
        return SensorResult(skip_reason=f"already materialised on {md5}", cursor=md5)
    request = RunRequest(run_key=md5, tags={"deepcluster/data_md5": md5})
    return SensorResult(run_requests=[request], cursor=md5)
