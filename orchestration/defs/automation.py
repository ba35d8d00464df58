"""Jobs and sensors: the whole graph, observing data/, a run on a new data version, inbox batches."""

from pathlib import Path

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

from deepcluster import inbox

from ..versions import dvc_md5
from .assets.curation import inbox_batches
from .resources import ArtifactStore, InboxStore

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


new_images_job = define_asset_job(
    "new_images_job",
    selection=AssetSelection.assets("new_images"),
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
