"""Real models for the registry and serving tests: built by the pipeline steps, tracked as Dagster
tracks them, in a private MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from deepcluster import pipeline, tracking
from deepcluster.models import build_model
from deepcluster.paths import Artifacts
from deepcluster.train import export_model
from tests.conftest import fast_params

PARAMS = fast_params(eval={"probe_epochs": 30})


def build(art: Artifacts, images: Path, epochs: int) -> Artifacts:
    """ingest -> train (tracked) -> features -> cluster -> evaluate (logged) in `art`."""
    pipeline.ingest(images, PARAMS, art, progress=False)
    run_id = tracking.training_run(art, PARAMS, images)
    with tracking.run_status(run_id):
        if epochs:
            pipeline.train_step(PARAMS, art, tracking.EpochLogger(run_id), progress=False)
        else:  # the network training starts from: same seed, same construction
            torch.manual_seed(PARAMS.train.seed)
            export_model(build_model(PARAMS.model, PARAMS.cluster.k), PARAMS, art.model)
    pipeline.features_step(PARAMS, art, progress=False)
    pipeline.cluster_step(PARAMS, art)
    metrics = pipeline.evaluate_step(PARAMS, art, progress=False)
    tracking.log_evaluation(run_id, metrics, art.eval_dir)
    return art


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
