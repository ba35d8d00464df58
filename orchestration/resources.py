"""Where the pipeline reads and writes (ArtifactStore), what it computes on (ComputeResource) and
where it tracks runs and registers models (MlflowTracking).

All default to this checkout (data/, artifacts/, data.dvc and mlflow.db at the repo root) and the
machine settings in params.yaml; environment variables move them without code changes (tests,
containers): DEEPCLUSTER_DATA, DEEPCLUSTER_ARTIFACTS, DEEPCLUSTER_DVC_FILE, DEEPCLUSTER_DEVICE,
MLFLOW_TRACKING_URI, DEEPCLUSTER_MLFLOW_UI.
"""

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from deepcluster.paths import Artifacts

from .config import DEFAULTS, ROOT


def from_env(**variables: str) -> dict[str, str]:
    """Field values from the environment: field name -> the variable that sets it, when set.

    Fields whose variable is unset keep their declared defaults.
    """
    return {field: os.environ[name] for field, name in variables.items() if name in os.environ}


class ArtifactStore(ConfigurableResource):
    """The image folder, its DVC pointer, and the artifacts root laid out as `deepcluster.paths`."""

    root: str = Field(str(ROOT / "artifacts"), description="artifacts root (the CLI's --artifacts)")
    data_dir: str = Field(str(ROOT / "data"), description="the image folder")
    dvc_file: str = Field(
        str(ROOT / "data.dvc"), description="DVC pointer whose md5 versions data/"
    )

    @classmethod
    def from_env(cls) -> "ArtifactStore":
        return cls(
            **from_env(
                root="DEEPCLUSTER_ARTIFACTS",
                data_dir="DEEPCLUSTER_DATA",
                dvc_file="DEEPCLUSTER_DVC_FILE",
            )
        )

    @property
    def layout(self) -> Artifacts:
        return Artifacts(Path(self.root))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


class ComputeResource(ConfigurableResource):
    """The training device and the number of decoding processes at ingest."""

    device: str = Field(DEFAULTS.train.device, description="auto | cpu | cuda")
    workers: int = Field(DEFAULTS.data.workers, description="decoding processes; 0 = in-process")

    @classmethod
    def from_env(cls) -> "ComputeResource":
        return cls(**from_env(device="DEEPCLUSTER_DEVICE"))


class MlflowTracking(ConfigurableResource):
    """The MLflow store the training runs and the model registry live in (`deepcluster.tracking`).

    A small resource over MLflow's own client instead of dagster-mlflow (a legacy integration): it
    only points MLflow at the store for the run and builds links to the MLflow UI for metadata.
    """

    tracking_uri: str = Field(
        f"sqlite:///{ROOT / 'mlflow.db'}",
        description="MLflow tracking and registry store; MLflow's default file at the repo root",
    )
    ui_url: str = Field(
        "http://127.0.0.1:5000", description="where `mlflow ui` serves this store (for links)"
    )

    @classmethod
    def from_env(cls) -> "MlflowTracking":
        return cls(**from_env(tracking_uri="MLFLOW_TRACKING_URI", ui_url="DEEPCLUSTER_MLFLOW_UI"))

    def setup_for_execution(self, context) -> None:
        import mlflow  # seconds to import; only steps that track need it

        mlflow.set_tracking_uri(self.tracking_uri)

    def run_url(self, run_id: str) -> str:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(self.tracking_uri).get_run(run_id).info.experiment_id
        return f"{self.ui_url}/#/experiments/{experiment}/runs/{run_id}"

    def model_url(self, name: str, version: str) -> str:
        return f"{self.ui_url}/#/models/{name}/versions/{version}"
