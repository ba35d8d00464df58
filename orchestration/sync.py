"""DVC and Dagster agree on what is up to date, whichever of them ran the pipeline.

- After a Dagster run (`make demo`, `python -m orchestration materialize`): `dvc commit` records
  the outputs the assets wrote, with the deps and params.yaml they were made from, so
  `dvc status` has nothing to do. Only when the run used params.yaml (not other launchpad values,
  which dvc.lock could not describe) and the files are the step layer's.
- After `dvc repro` (its last stage runs `python -m orchestration sync`): each asset whose files
  exist is recorded in the Dagster instance as materialised, with the data version Dagster itself
  would compute (code version + input data versions) and that provenance, so no asset shows as
  stale until its code, its inputs or data.dvc change.

Dagster's provenance tag names are not public API; `record_materialisations` is covered by a
test that asks Dagster's own stale-status resolver.
"""

import os
import subprocess
from pathlib import Path

from dagster import AssetKey, AssetMaterialization, AssetObservation, DagsterInstance
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_TAG,
    DataVersion,
    compute_logical_data_version,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

from deepcluster.paths import Artifacts

from .config import ROOT
from .versions import observed_version

DVC = Path(os.environ.get("DEEPCLUSTER_DVC", ROOT / ".dvc-venv" / "bin" / "dvc"))
SOURCE = AssetKey("raw_images")


def asset_files(art: Artifacts) -> dict[str, list[Path]]:
    """The files each asset writes (as DVC's stages list them): an asset is recorded only when
    all of them exist."""
    return {
        "image_manifest": [art.manifest, art.rejected],
        "image_cache": [art.cache],
        "checkpoint": [art.model, art.trained_params, art.history],
        "features": [art.features],
        "cluster_assignments": [art.assignments, art.clustering],
        "eval_report": [art.metrics],
        "registered_model": [art.registration],
        "curated_subset": [art.curated_subset],
    }


def record_materialisations(instance: DagsterInstance, defs, art: Artifacts, dvc_file, data_dir):
    """Record the artifacts on disk as materialisations with Dagster's provenance; returns the
    asset keys recorded, in graph order."""
    graph = defs.resolve_asset_graph()
    source_version = observed_version(dvc_file, data_dir)[0]
    instance.report_runless_asset_event(
        AssetObservation(SOURCE, tags={DATA_VERSION_TAG: source_version})
    )
    versions = {SOURCE: DataVersion(source_version)}
    recorded = []
    files = asset_files(art)
    for key in graph.toposorted_asset_keys:
        name = key.to_user_string()
        if name not in files or not all(path.exists() for path in files[name]):
            continue
        node = graph.get(key)
        inputs = {dep: versions[dep] for dep in node.parent_keys if dep in versions}
        if len(inputs) != len(node.parent_keys):
            continue  # an input was not recorded: this asset's files are not from this pipeline
        versions[key] = compute_logical_data_version(node.code_version, inputs)
        tags = {DATA_VERSION_TAG: versions[key].value, CODE_VERSION_TAG: node.code_version}
        for dep, version in inputs.items():
            record = instance.get_latest_data_version_record(dep, graph.get(dep).is_external)
            tags[get_input_data_version_tag(dep)] = version.value
            tags[get_input_event_pointer_tag(dep)] = str(record.storage_id) if record else "NULL"
        instance.report_runless_asset_event(
            AssetMaterialization(key, metadata={"recorded_from": "dvc repro"}, tags=tags)
        )
        recorded.append(name)
    return recorded


def dvc_commit(cwd: Path = ROOT) -> str | None:
    """`dvc commit --force` of every stage, or the reason it was not done."""
    if not DVC.exists():
        return f"{DVC} not found (make install creates it)"
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [str(DVC), "commit", "--force", "--quiet"], cwd=cwd, env=env,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return None if done.returncode == 0 else f"dvc commit failed: {done.stderr.strip()[-500:]}"
