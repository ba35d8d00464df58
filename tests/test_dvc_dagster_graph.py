"""The DVC stages (dvc.yaml) and the Dagster assets describe the same pipeline.

Each DVC stage maps to the assets that compute the same files; a stage must come before another in
dvc.yaml's dependency graph exactly when one of its assets comes before one of the other's assets
in Dagster's. Comparing "comes before" (ancestry) rather than direct edges lets either front end
list an extra direct input (DVC's evaluate reads the image cache directly, for instance).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import AssetKey

pytestmark = pytest.mark.slow  # loads the Dagster graph and the DVC pipeline

ROOT = Path(__file__).resolve().parents[1]
STAGE_ASSETS = {
    "data.dvc": ["raw_images"],
    "ingest": ["image_manifest", "image_cache"],  # one CLI step, two assets
    "train": ["checkpoint"],
    "features": ["features"],
    "cluster": ["cluster_assignments"],
    "evaluate": ["eval_report"],
    "register": ["registered_model"],
    "curate": ["curated_subset"],
}


NOT_STEPS = {"dagster"}  # records a repro in Dagster's instance (orchestration/sync.py)


def pipeline_stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage for name, stage in stages.items() if name not in NOT_STEPS}


def dvc_parents() -> dict[str, set[str]]:
    """Stage -> the stages (or data.dvc) whose outputs it reads."""
    stages = pipeline_stages()
    data_out = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["path"]
    producers = {data_out: "data.dvc"}
    for name, stage in stages.items():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            producers[out if isinstance(out, str) else next(iter(out))] = name

    def producer(dep: str) -> str | None:
        return next(
            (s for out, s in producers.items() if dep == out or dep.startswith(f"{out}/")), None
        )

    return {
        name: {p for dep in stage.get("deps", []) if (p := producer(dep)) and p != name}
        for name, stage in stages.items()
    } | {"data.dvc": set()}


def ancestors(parents: dict[str, set[str]], node: str) -> set[str]:
    seen: set[str] = set()
    todo = list(parents.get(node, ()))
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += parents.get(current, ())
    return seen


def dagster_parents() -> dict[str, set[str]]:
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }


def test_every_stage_has_its_assets_and_the_same_order() -> None:
    dvc, dagster = dvc_parents(), dagster_parents()
    assert set(dvc) == set(STAGE_ASSETS), "a DVC stage without an asset mapping (or the reverse)"
    missing = sorted(a for assets in STAGE_ASSETS.values() for a in assets if a not in dagster)
    wired = [s for s, assets in STAGE_ASSETS.items() if all(a in dagster for a in assets)]
    for stage in wired:
        for other in (o for o in wired if o != stage):
            dvc_before = other in ancestors(dvc, stage)
            dagster_before = any(
                a in ancestors(dagster, b) for a in STAGE_ASSETS[other] for b in STAGE_ASSETS[stage]
            )
            assert dvc_before == dagster_before, (
                f"DVC says {other} {'comes' if dvc_before else 'does not come'} before {stage}; "
                f"Dagster says the opposite"
            )
    if missing:
        pytest.xfail(f"Dagster assets not wired yet: {', '.join(missing)}")


def test_stage_deps_and_code_versions_come_from_one_module_table() -> None:
    """dvc.yaml's library deps of each stage are the step's modules (step_modules), and each
    asset's Dagster code version is the hash of the same modules."""
    from deepcluster.pipeline import STEP_CALLS, code_version, module_paths
    from orchestration.definitions import defs

    for stage, spec in pipeline_stages().items():
        listed = sorted(d for d in spec["deps"] if d.startswith("ssl/"))
        assert listed == sorted(module_paths(stage)), stage
        for name in module_paths(stage):
            assert (ROOT / name).is_file(), name
    graph = defs.resolve_asset_graph()
    for stage, assets in STAGE_ASSETS.items():
        if stage in STEP_CALLS:
            for asset in assets:
                assert graph.get(AssetKey(asset)).code_version == code_version(stage), asset


def test_a_step_depends_on_every_module_its_modules_import() -> None:
    """The step table follows the imports: features and train both run embed.compute_features, so
    editing embed.py marks both stale; any module a listed module imports is listed too."""
    from deepcluster import sources
    from deepcluster.pipeline import STEP_CALLS, step_modules

    assert "embed" in step_modules("features") and "embed" in step_modules("train")
    for step in STEP_CALLS:
        modules = step_modules(step)
        for name in set(modules) - {"pipeline"}:
            assert sources.imported_by(name) - sources.PLUMBING <= set(modules), (step, name)
