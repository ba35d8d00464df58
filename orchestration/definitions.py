"""The code location: `dg dev` loads `defs` ([tool.dg] in pyproject.toml)."""

import os

import yaml
from dagster import Definitions, ExecutorDefinition, in_process_executor, multiprocess_executor

from .assets import (
    cluster_assignments,
    eval_report,
    features,
    ingest,
    raw_images,
    registered_model,
)
from .automation import data_version_sensor, deepcluster_job, observe_data_job
from .checks import CHECKS
from .curation import (  # curated subset, new images, drift: see orchestration/curation.py
    CURATION_ASSETS,
    CURATION_CHECKS,
    CURATION_JOBS,
    CURATION_RESOURCES,
    CURATION_SENSORS,
)
from .resources import ArtifactStore, ComputeResource, MlflowTracking
from .training import checkpoint


def executor() -> ExecutorDefinition:
    """In-process by default: the graph is a chain, so a process per step buys no parallelism and
    costs a fresh import of torch, Dagster and GX per step (about 10 s each on two busy cores).
    DEEPCLUSTER_EXECUTOR=multiprocess isolates steps; =k8s runs each step in its own pod (needs
    dagster-k8s), where train_epochs' tags ask for a GPU. DEEPCLUSTER_EXECUTOR_CONFIG (YAML or
    JSON) is the executor's config, e.g. the k8s executor's `per_step_k8s_config` that puts
    train_epochs on GPU nodes (deploy/helm/values.yaml)."""
    name = os.environ.get("DEEPCLUSTER_EXECUTOR", "in_process")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # only in the deploy image

        chosen = k8s_job_executor
    else:
        chosen = {"in_process": in_process_executor, "multiprocess": multiprocess_executor}[name]
    config = os.environ.get("DEEPCLUSTER_EXECUTOR_CONFIG")
    return chosen.configured(yaml.safe_load(config)) if config else chosen


defs = Definitions(
    assets=[
        raw_images,
        ingest,
        checkpoint,
        features,
        cluster_assignments,
        eval_report,
        registered_model,
        *CURATION_ASSETS,
    ],
    asset_checks=CHECKS + CURATION_CHECKS,
    jobs=[deepcluster_job, observe_data_job, *CURATION_JOBS],
    sensors=[data_version_sensor, *CURATION_SENSORS],
    resources={
        "artifacts": ArtifactStore.from_env(),
        "compute": ComputeResource.from_env(),
        "mlflow": MlflowTracking.from_env(),
        **CURATION_RESOURCES,
    },
    executor=executor(),
)
