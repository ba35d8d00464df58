"""DVC and Dagster agree on what is up to date, whichever ran the pipeline: after a Dagster run
`dvc commit` records the outputs (when it used the repo's params and folders); after `dvc repro`
each asset whose files exist is recorded by a stand-in with its key, deps and code version, so
Dagster derives data versions and provenance as in any run and nothing shows as stale."""

import os
import subprocess
from pathlib import Path

import dagster as dg

from deepcluster.paths import Artifacts

from .config import ROOT

DVC = Path(os.environ.get("DEEPCLUSTER_DVC", ROOT / ".dvc-venv" / "bin" / "dvc"))
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def asset_files(art: Artifacts) -> dict[str, list[Path]]:
    """The files each asset writes, as DVC's stages list them."""
    return {"image_manifest": [art.manifest, art.rejected], "image_cache": [art.cache],
            "checkpoint": [art.model, art.published.params, art.history], "features": [art.features],
            "cluster_assignments": [art.assignments, art.clustering], "eval_report": [art.metrics],
            "registered_model": [art.registration], "curated_subset": [art.curated_subset]}


def record_materialisations(instance: dg.DagsterInstance, defs: dg.Definitions,
                            art: Artifacts) -> list[str]:
    """Observe data/, then record every asset whose files all exist and whose inputs are recorded
    too; returns their names, in graph order."""
    defs.resolve_job_def("observe_data").execute_in_process(run_config=QUIET, instance=instance)
    graph, files, recorded = defs.resolve_asset_graph(), asset_files(art), []
    for key in graph.toposorted_asset_keys:
        name, parents = key.to_user_string(), graph.get(key).parent_keys
        inputs_recorded = all(p.to_user_string() in ["raw_images", *recorded] for p in parents)
        if name in files and all(path.exists() for path in files[name]) and inputs_recorded:
            recorded.append(name)
    specs = [s for s in defs.resolve_all_asset_specs() if s.key.to_user_string() in recorded]
    if specs:
        dg.materialize([_stand_in(spec) for spec in specs], instance=instance, run_config=QUIET,
                       tags={"deepcluster/recorded_from": "dvc repro"})
    return recorded


def _stand_in(spec: dg.AssetSpec):
    @dg.multi_asset(specs=[spec.replace_attributes(automation_condition=None)],
                    name=f"record_{spec.key.to_python_identifier()}")
    def record() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"recorded_from": "dvc repro"})

    return record


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
