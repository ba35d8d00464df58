"""Real models for the registry and serving tests: built by the pipeline steps, tracked as Dagster
tracks them, in a private MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from deepcluster import figures, registry
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


def clear_of_baselines(art: Artifacts, folder: Path, **figures_: float) -> Artifacts:
    """`with_metrics` with every baseline figure at the floor of its range, so that only the
    champion comparison decides: for the tests of that rule, not of the baseline gate
    (test_registry.py tests the gate on the real figures)."""
    floors = {
        f"{key}_{base}": figures.FIGURES[key].lo
        for key in (*figures.PROBES, *figures.LABEL_FREE)
        for base in figures.BASELINES
    }
    return with_metrics(art, folder, **{**floors, **figures_})


def register_as_champion(art: Artifacts, name: str = registry.MODEL_NAME) -> registry.Registration:
    """Register `art` and hand it `champion` through the registry API, whatever the rule says:
    for tests that need a champion to load and serve, not a judgement of it."""
    reg = registry.register_model(art, name=name)
    MlflowClient().set_registered_model_alias(name, registry.CHAMPION, reg.version)
    return reg


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
