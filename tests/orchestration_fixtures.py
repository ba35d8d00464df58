"""Helpers for the orchestration tests: run config with the suite's FAST params and resources
pointing at tmp (the `digits_subset` folder they run on is a fixture in conftest.py)."""

from pathlib import Path

from orchestration.config import run_config_for
from orchestration.defs.resources import ArtifactStore, ComputeResource, MlflowTracking
from tests.conftest import fast_params

# What the whole graph must produce: every asset but the observed source, and each check by asset.
MATERIALISED = [
    "image_manifest",
    "image_cache",
    "checkpoint",
    "features",
    "cluster_assignments",
    "eval_report",
    "registered_model",
    "curated_subset",
]
# one inbox batch (a dynamic partition) per run, so not part of deepcluster_job
PARTITIONED = ["new_images"]
CHECKS_BY_ASSET = {
    "image_manifest": ["manifest_is_valid"],
    "features": ["features_are_sound"],
    "cluster_assignments": ["no_cluster_collapse", "whitened_features_unit_norm"],
    "eval_report": ["clusters_follow_content"],
}
CHECK_NAMES = {name for names in CHECKS_BY_ASSET.values() for name in names}
# checks that only warn: their outcome depends on what a short training learned
WARNING_CHECKS = {"clusters_follow_content"}


def fast_run_config(**sections) -> dict:
    """Run config for the whole graph with the FAST params (plus `sections` overrides)."""
    return run_config_for(fast_params(**sections))


def store_in(tmp_path: Path, data_dir: Path) -> ArtifactStore:
    """Artifacts and a (not yet existing) data.dvc under tmp_path; nothing in the repo is touched."""
    return ArtifactStore(
        root=str(tmp_path / "artifacts"),
        data_dir=str(data_dir),
        dvc_file=str(tmp_path / "data.dvc"),
    )


def resources_in(tmp_path: Path, data_dir: Path) -> dict:
    """Artifacts, CPU, and an MLflow store of the test's own (sqlite under tmp_path)."""
    return {
        "artifacts": store_in(tmp_path, data_dir),
        "compute": ComputeResource(device="cpu"),
        "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    }


def only_ops(run_config: dict, *ops: str) -> dict:
    """`run_config` cut down to the given ops (a job rejects config for ops it does not have)."""
    return {
        **run_config,
        "ops": {op: run_config["ops"][op] for op in ops if op in run_config["ops"]},
    }


def project_instance_settings() -> dict:
    """orchestration/dagster.yaml, as `instance_for_test(overrides=...)` takes it."""
    import yaml

    from tests.conftest import ROOT

    return yaml.safe_load((ROOT / "orchestration" / "dagster.yaml").read_text())
