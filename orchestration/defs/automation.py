"""Jobs and sensors: the whole graph, observing data/, the automation that runs the graph on a new
data version (its conditions are declared on the assets), and one run per new inbox batch."""

from pathlib import Path

import dagster as dg

from deepcluster import inbox

from .assets.curation import inbox_batches
from .resources import InboxStore

# AssetSelection objects, not strings: those need an antlr4 runtime DVC pins to another version
deepcluster_job = dg.define_asset_job(
    "deepcluster_job", selection=dg.AssetSelection.all() - dg.AssetSelection.assets("new_images"),
    description="Every asset and check, from the image folder to the evaluation report.",
)  # fmt: skip
observe_data_job = dg.define_asset_job(
    "observe_data", selection=dg.AssetSelection.assets("raw_images"),
    description="Records data/'s data version (data.dvc's md5): what is stale follows from it.",
)  # fmt: skip

# Evaluates the assets' conditions (raw_images observed every five minutes; eager after a new data
# version). Stopped by default: switch it on under Automation in the UI (`dg dev` runs the daemon).
data_version_sensor = dg.AutomationConditionSensorDefinition(
    "data_version_sensor", target=dg.AssetSelection.all() | dg.AssetSelection.assets("raw_images"),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Runs the graph when data.dvc pins a new md5 (conditions declared on the assets).",
)  # fmt: skip

new_images_job = dg.define_asset_job(
    "new_images_job", selection=dg.AssetSelection.assets("new_images"),
    description="Assign one inbox batch with the champion and check it for drift.",
)  # fmt: skip


@dg.sensor(job=new_images_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.STOPPED)  # fmt: skip
def inbox_sensor(context: dg.SensorEvaluationContext, inbox_store: InboxStore) -> dg.SensorResult:
    """Adds a new_images partition and requests its run for each settled inbox folder."""
    try:
        batches = inbox.list_batches(Path(inbox_store.folder), inbox_store.settle_seconds)
    except inbox.InboxError as err:
        return dg.SensorResult(skip_reason=str(err))
    if batches.invalid:
        context.log.warning(f"folder names that cannot be batch names: {batches.invalid}")
    known = set(context.instance.get_dynamic_partitions(inbox_batches.name))
    new = [name for name in batches.ready if name not in known]
    if not new:
        waiting = f"; still settling: {', '.join(batches.waiting)}" if batches.waiting else ""
        return dg.SensorResult(skip_reason=f"no new batch in {inbox_store.folder}{waiting}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=name, partition_key=name) for name in new],
        dynamic_partitions_requests=[inbox_batches.build_add_request(new)],
    )
