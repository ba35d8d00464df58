"""Resources: the folders (ArtifactStore), the machine (ComputeResource), MLflow (MlflowTracking),
the inbox of new batches (InboxStore); and the executor.

Each field defaults to this checkout and params.yaml's `compute` section; when its environment
variable is set, the field reads it as an `EnvVar`, and the UI shows where the value came from.
"""

import os
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from pydantic import Field

from deepcluster import inbox
from deepcluster.paths import Artifacts

from ..config import DEFAULTS, ROOT


def from_env(**variables: str) -> dict[str, Any]:
    """Field -> EnvVar(name) for each variable that is set; unset ones keep their defaults."""
    return {field: dg.EnvVar(name) for field, name in variables.items() if name in os.environ}


class ArtifactStore(dg.ConfigurableResource):
    """The image folder, its DVC pointer, and the artifacts root (`deepcluster.paths.Artifacts`)."""

    root: str = Field(str(ROOT / "artifacts"), description="artifacts root (the CLI's --artifacts)")
    data_dir: str = Field(str(ROOT / "data"), description="the image folder")
    dvc_file: str = Field(str(ROOT / "data.dvc"), description="DVC pointer: data/'s md5")

    @classmethod
    def from_env(cls) -> "ArtifactStore":
        return cls(**from_env(root="DEEPCLUSTER_ARTIFACTS", data_dir="DEEPCLUSTER_DATA",
                              dvc_file="DEEPCLUSTER_DVC_FILE"))  # fmt: skip

    @property
    def layout(self) -> Artifacts:
        return Artifacts(Path(self.root))


class ComputeResource(dg.ConfigurableResource):
    """params.yaml's `compute` section: the machine a step runs on, not the experiment."""

    device: str = Field(DEFAULTS.compute.device, description="auto | cpu | cuda")
    amp: bool = Field(DEFAULTS.compute.amp, description="bfloat16 autocast where it is fast")
    threads: str = Field(str(DEFAULTS.compute.threads), description="torch threads, or auto")
    workers: int = Field(DEFAULTS.compute.workers, description="decoding processes at ingest")
    nproc: int = Field(1, description="training processes (torchrun, one per GPU or core group)")
    sync_bn: bool = Field(DEFAULTS.compute.sync_bn, description="batch norm over the global batch")

    @classmethod
    def from_env(cls) -> "ComputeResource":
        return cls(**from_env(device="DEEPCLUSTER_DEVICE", threads="DEEPCLUSTER_THREADS"))

    def section(self) -> dict[str, Any]:
        """The `compute` section of Params."""
        threads = int(self.threads) if self.threads.isdigit() else self.threads
        return {"device": self.device, "amp": self.amp, "threads": threads,
                "workers": self.workers, "sync_bn": self.sync_bn}  # fmt: skip


class MlflowTracking(dg.ConfigurableResource):
    """The MLflow store of the runs and the registry (a small resource over MLflow's own client;
    dagster-mlflow is a legacy integration): set for the step and its subprocesses, and the base
    of links to the MLflow UI."""

    tracking_uri: str = Field(f"sqlite:///{ROOT / 'mlflow.db'}",
                              description="MLflow tracking and registry store")  # fmt: skip
    ui_url: str = Field("http://127.0.0.1:5000", description="where `mlflow ui` serves it (links)")

    @classmethod
    def from_env(cls) -> "MlflowTracking":
        return cls(**from_env(tracking_uri="MLFLOW_TRACKING_URI", ui_url="DEEPCLUSTER_MLFLOW_UI"))

    def setup_for_execution(self, context) -> None:
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri  # the library and subprocesses

    def run_url(self, run_id: str) -> str:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(self.tracking_uri).get_run(run_id).info.experiment_id
        return f"{self.ui_url}/#/experiments/{experiment}/runs/{run_id}"

    def model_url(self, name: str, version: str) -> str:
        return f"{self.ui_url}/#/models/{name}/versions/{version}"


class InboxStore(dg.ConfigurableResource):
    """The folder new batches arrive in (one sub-folder each) and the model that assigns them."""

    folder: str = Field(str(ROOT / "inbox"), description="inbox folder; env DEEPCLUSTER_INBOX")
    settle_seconds: float = Field(30.0, description="a batch counts once unchanged this long")
    model_uri: str = Field(inbox.DEFAULT_MODEL, description="the registered model that assigns")

    @classmethod
    def from_env(cls) -> "InboxStore":
        return cls(**from_env(folder="DEEPCLUSTER_INBOX"))


def executor() -> dg.ExecutorDefinition:
    """In-process by default: the graph is a chain, so a process per step buys no parallelism and
    costs a fresh import of torch, Dagster and GX (about 10 s a step on two busy cores).
    DEEPCLUSTER_EXECUTOR=multiprocess isolates steps; =k8s runs each in its own pod (dagster-k8s);
    DEEPCLUSTER_EXECUTOR_CONFIG (YAML) is the executor's config (deploy/helm/values.yaml)."""
    name = os.environ.get("DEEPCLUSTER_EXECUTOR", "in_process")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor  # only in the deploy image

        chosen = k8s_job_executor
    else:
        chosen = {"in_process": dg.in_process_executor,
                  "multiprocess": dg.multiprocess_executor}[name]
    config = os.environ.get("DEEPCLUSTER_EXECUTOR_CONFIG")
    return chosen.configured(yaml.safe_load(config)) if config else chosen


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(executor=executor(), resources={
        "artifacts": ArtifactStore.from_env(), "compute": ComputeResource.from_env(),
        "mlflow": MlflowTracking.from_env(), "inbox_store": InboxStore.from_env(),
    })  # fmt: skip
