"""The registered model: the promotion rule, lookup by alias in other processes, HTTP serving.

Two real models on 300 real digits, in a private MLflow store: the network training starts from
(0 epochs) and the same network trained for FAST's epochs. Both go through the pipeline steps and
the tracking calls Dagster makes, then into the registry.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from deepcluster import pipeline, registry, tracking
from deepcluster.errors import UserError
from deepcluster.models import build_model
from deepcluster.paths import Artifacts
from deepcluster.train import export_model

from .conftest import fast_params, run_cli

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="module")
def registered(store: str, digits_subset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Register low, high, low again (ordered by their real NMI): all three branches of the rule."""
    base = tmp_path_factory.mktemp("models")
    images = digits_subset  # 300 real digits, class-per-folder (conftest)
    models = [build(Artifacts(base / f"epochs{n}"), images, n) for n in (0, PARAMS.train.epochs)]
    nmi = [json.loads(art.metrics.read_text())["nmi"] for art in models]
    assert nmi[0] != nmi[1], "two models with the same NMI cannot test promotion"
    low, high = (models[0], models[1]) if nmi[0] < nmi[1] else (models[1], models[0])
    regs = [registry.register_model(art) for art in (low, high, low)]
    return {"images": images, "low": low, "high": high, "regs": regs, "uri": store}


def test_first_version_is_champion_a_better_one_takes_over_a_worse_one_does_not(registered):
    first, better, worse = registered["regs"]
    assert (first.version, first.promoted, first.champion_before) == ("1", True, None)
    assert first.metric == "nmi"  # labels exist, so "auto" means NMI against them
    assert (better.version, better.promoted, better.champion_before) == ("2", True, "1")
    assert better.value > first.value == better.champion_value
    assert (worse.version, worse.promoted, worse.champion_before) == ("3", False, "2")
    assert worse.value < worse.champion_value == better.value

    client = MlflowClient()
    assert str(client.get_model_version_by_alias("deepcluster", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("deepcluster", "candidate").version) == "3"
    tags = client.get_model_version("deepcluster", "3").tags
    assert tags["promotion_metric"] == "nmi" and tags["promoted"] == "false"
    assert first.summary().endswith("no champion before; now champion")
    assert f"champion was version 2 with {better.value:.4f}; stays candidate" in worse.summary()


README_SNIPPET = """
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/deepcluster@champion")
out = model.predict(pd.DataFrame({"path": paths}))
"""


def test_the_champion_in_another_process_assigns_like_the_pipeline(registered, tmp_path):
    high: Artifacts = registered["high"]
    table = pl.read_parquet(high.assignments)
    paths = [str(registered["images"] / p) for p in table["path"]]
    script = (
        f"import json, sys\npaths = json.loads(sys.argv[1])\n{README_SNIPPET}"
        "out[['cluster']].to_parquet(sys.argv[2])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model brings its code
    env["MLFLOW_TRACKING_URI"] = registered["uri"]
    result = tmp_path / "clusters.parquet"
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths), str(result)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pd.read_parquet(result)["cluster"].to_numpy()
    assert np.mean(predicted == table["cluster"].to_numpy()) >= 0.99


def test_predict_command_writes_assignments(registered, tmp_path):
    high: Artifacts = registered["high"]
    out = tmp_path / "assignments.parquet"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    done = run_cli("predict", str(registered["images"]), "--out", str(out), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pl.read_parquet(out)
    assert predicted.columns == ["path", "cluster", "distance", "embedding"]
    expected = pl.read_parquet(high.assignments)
    assert predicted["path"].to_list() == [str(registered["images"] / p) for p in expected["path"]]
    assert (predicted["cluster"] == expected["cluster"]).mean() >= 0.99
    assert len(predicted["embedding"][0]) == PARAMS.model.embed_dim


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_with_cluster_ids(registered, tmp_path):
    high: Artifacts = registered["high"]
    table = pl.read_parquet(high.assignments).head(20)
    port = free_port()
    bin_dir = Path(sys.executable).parent  # uvicorn, started by `mlflow models serve`, lives here
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/deepcluster@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=sink, stderr=sink, start_new_session=True
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, log)
        images = [
            [base64.b64encode((registered["images"] / p).read_bytes()).decode()]
            for p in table["path"]
        ]
        body = {"dataframe_split": {"columns": ["image"], "data": images}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.load(response)["predictions"]
        assert [p["cluster"] for p in predictions] == table["cluster"].to_list()
        assert len(predictions[0]["embedding"]) == PARAMS.model.embed_dim
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the uvicorn it started
        server.wait(timeout=30)


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the model server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the model server did not answer {url} within {timeout}s")


def test_bad_input_gets_a_clear_error(registered):
    model = mlflow.pyfunc.load_model("models:/deepcluster@candidate")
    with pytest.raises(UserError, match="row 0: `image` is not a decodable image"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))
    with pytest.raises(UserError, match="nowhere.png: cannot read it as an image"):
        model.predict(pd.DataFrame({"path": ["nowhere.png"]}))


def test_an_unknown_metric_names_the_usable_ones(registered):
    with pytest.raises(UserError, match="metric 'accurcy' has no value.*accuracy"):
        registry.register_model(registered["high"], metric="accurcy")
