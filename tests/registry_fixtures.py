"""Real models for the registry and serving tests: built by the pipeline steps, tracked as Dagster
tracks them, in a private MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from deepcluster.paths import Artifacts
from tests.conftest import build_artifacts, fast_params

PARAMS = fast_params(eval={"probe_epochs": 30})


def build(art: Artifacts, images: Path, epochs: int) -> Artifacts:
    """The pipeline's steps in `art`; with `epochs` 0, the untrained network as the model."""
    return build_artifacts(art, images, PARAMS, trained=bool(epochs))


def with_metrics(art: Artifacts, folder: Path, **figures) -> Artifacts:
    """A copy of `art` (same model, same MLflow run) whose metrics.json says `figures` instead,
    as a re-evaluation with other settings would."""
    copy = Artifacts(folder)
    shutil.copytree(art.root, copy.root)
    metrics = {**json.loads(art.metrics.read_text()), **figures}
    copy.metrics.write_text(json.dumps(metrics))
    return copy


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A private sqlite store; the working directory moves there so ./mlruns lands there too."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
        mp.chdir(folder)
        yield uri
