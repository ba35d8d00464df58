"""Resources (folders, machine, MLflow, inbox) and the executor. Fields default to this checkout
and params.yaml's `compute`; a set environment variable is read as an `EnvVar`, shown in the UI."""

import os
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import yaml
from pydantic import Field

from deepcluster import inbox
from deepcluster.paths import Artifacts

from ..config import DEFAULTS, ROOT


class FromEnv:
    ENV: ClassVar[dict[str, str]] = {}  # field -> the environment variable that may set it

    @classmethod
    def from_env(cls):
        """Each field whose variable is set reads it (EnvVar); the others keep their defaults."""
        return cls(**{field: dg.EnvVar(name) for field, name in cls.ENV.items()
                      if name in os.environ})  # fmt: skip


class ArtifactStore(FromEnv, dg.ConfigurableResource):
    """The image folder, its DVC pointer, and the artifacts root (`deepcluster.paths.Artifacts`)."""

    root: str = Field(str(ROOT / "artifacts"), description="artifacts root (the CLI's --artifacts)")
    data_dir: str = Field(str(ROOT / "data"), description="the image folder")
    dvc_file: str = Field(str(ROOT / "data.dvc"), description="DVC pointer: data/'s md5")

    ENV: ClassVar[dict[str, str]] = {
        "root": "DEEPCLUSTER_ARTIFACTS", "data_dir": "DEEPCLUSTER_DATA", "dvc_file": "DEEPCLUSTER_DVC_FILE"
    }  # fmt: skip

    @property
    def layout(self) -> Artifacts:
        return Artifacts(Path(self.root))


class ComputeResource(FromEnv, dg.ConfigurableResource):
    """params.yaml's `compute` section: the machine a step runs on, not the experiment."""

    device: str = Field(DEFAULTS.compute.device, description="auto | cpu | cuda")
    amp: bool = Field(DEFAULTS.compute.amp, description="bfloat16 autocast where it is fast")
    threads: str = Field(str(DEFAULTS.compute.threads), description="torch threads, or auto")
    workers: int = Field(DEFAULTS.compute.workers, description="decoding processes at ingest")
    nproc: int = Field(1, description="training processes (torchrun, one per GPU or core group)")
    sync_bn: bool = Field(DEFAULTS.compute.sync_bn, description="batch norm over the global batch")

    ENV: ClassVar[dict[str, str]] = {"device": "DEEPCLUSTER_DEVICE", "threads": "DEEPCLUSTER_THREADS"}

    def section(self) -> dict[str, Any]:
        """The `compute` section of Params."""
        threads = int(self.threads) if self.threads.isdigit() else self.threads
        return {"device": self.device, "amp": self.amp, "threads": threads,
                "workers": self.workers, "sync_bn": self.sync_bn}  # fmt: skip


class MlflowTracking(FromEnv, dg.ConfigurableResource):
    """The MLflow store of runs and registry, set for the step and its subprocesses, and the base of
    links to the MLflow UI (dagster-mlflow is a legacy integration)."""

    tracking_uri: str = Field(f"sqlite:///{ROOT / 'mlflow.db'}",
                              description="MLflow tracking and registry store")  # fmt: skip
    ui_url: str = Field("http://127.0.0.1:5000", description="where `mlflow ui` serves it (links)")

    ENV: ClassVar[dict[str, str]] = {"tracking_uri": "MLFLOW_TRACKING_URI", "ui_url": "DEEPCLUSTER_MLFLOW_UI"}

    def setup_for_execution(self, context) -> None:
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri  # the library and subprocesses

    def run_url(self, run_id: str) -> str:
        from mlflow.tracking import MlflowClient

        from deepcluster.tracking import ui_link

        experiment = MlflowClient(self.tracking_uri).get_run(run_id).info.experiment_id
        return ui_link(self.ui_url, f"experiments/{experiment}/runs/{run_id}")

    def model_url(self, name: str, version: str) -> str:
        from deepcluster.tracking import ui_link

        return ui_link(self.ui_url, f"models/{name}/versions/{version}")


class InboxStore(FromEnv, dg.ConfigurableResource):
    """The folder new batches arrive in (one sub-folder each) and the model that assigns them."""

    folder: str = Field(str(ROOT / "inbox"), description="inbox folder; env DEEPCLUSTER_INBOX")
    settle_seconds: float = Field(30.0, description="a batch counts once unchanged this long")
    model_uri: str = Field(inbox.DEFAULT_MODEL, description="the registered model that assigns")

    ENV: ClassVar[dict[str, str]] = {"folder": "DEEPCLUSTER_INBOX"}


def executor() -> dg.ExecutorDefinition:
    """In-process by default (a chain gains nothing from a process per step, which re-imports torch);
    DEEPCLUSTER_EXECUTOR=multiprocess | k8s, with DEEPCLUSTER_EXECUTOR_CONFIG (YAML) as its config."""
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
