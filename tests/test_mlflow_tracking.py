"""Lineage and MLflow runs from the CLI: params, per-epoch metrics, the DVC md5 as dataset input.

The md5 that `deepcluster.lineage` computes is checked against the real `dvc` (its own environment,
.dvc-venv) and against the committed data.dvc.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from deepcluster import checkpoint, epochs, lineage, pipeline, tracking
from deepcluster.config import load_params
from deepcluster.paths import Artifacts

from .conftest import FAST, fast_params, run_cli
from .test_dvc_pipeline import GIT_IDENTITY, require_dvc
from .test_ingest_safety import ingest_cli

pytestmark = pytest.mark.slow  # real MLflow stores and CLI runs

ROOT = Path(__file__).resolve().parents[1]
DVC = ROOT / ".dvc-venv" / "bin" / "dvc"


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def dvc_add(repo: Path, folder: str) -> str:
    """`dvc add` with the real dvc in a git repo; the md5 it writes into <folder>.dvc."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (["init", "-q"], ["add", "-q", folder]):
        done = subprocess.run(
            [str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    return yaml.safe_load((repo / f"{folder}.dvc").read_text())["outs"][0]["md5"]


def test_a_fresh_export_has_the_md5_committed_in_data_dvc(digits_folder: Path) -> None:
    committed, _ = lineage.recorded_md5(ROOT / "data.dvc")
    assert lineage.dvc_dir_md5(lineage.folder_hashes(digits_folder)) == committed


def test_the_md5_is_the_one_dvc_computes(tmp_path: Path) -> None:
    require_dvc()
    folder = tmp_path / "images"
    for relative, content in {
        "b/2.png": b"two",
        "a/1.png": b"one",
        "a/sub/3.png": b"three" * 1000,
        ".hidden": b"dvc counts hidden files too",
        "x y.txt": b"spaces",
    }.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    git("init", "-q", cwd=tmp_path)
    assert lineage.dvc_dir_md5(lineage.folder_hashes(folder)) == dvc_add(tmp_path, "images")


def test_an_edited_folder_is_not_credited_with_its_old_dvc_version(tmp_path: Path, digits_folder):
    folder, dvc_file = tmp_path / "data", ROOT / "data.dvc"
    shutil.copytree(digits_folder, folder)
    art = Artifacts(tmp_path / "artifacts")
    before = pipeline.ingest(folder, fast_params(), art, show=False, dvc_file=dvc_file).data_version
    assert (before.source, before.md5) == ("dvc", lineage.recorded_md5(dvc_file)[0])
    assert lineage.recorded_version(art, dvc_file).tracked
    (folder / "0" / "0000.png").write_bytes((folder / "1" / "0001.png").read_bytes())
    after = pipeline.ingest(folder, fast_params(), art, show=False, dvc_file=dvc_file).data_version
    # the duplicate's bytes were read by the scan: DVC's md5 of the edited folder, not the old one
    assert after.md5 == lineage.dvc_dir_md5(lineage.folder_hashes(folder)) != before.md5
    assert after.source == "dvc" and not lineage.recorded_version(art, dvc_file).tracked


def test_training_records_the_version_of_the_images_it_trained_on(tmp_path: Path, digits_folder):
    """300 images ingested, 30 added, the ingest of the 330 fails while writing its set: training
    runs on the 300 and records their version (it once recorded the old md5 for the new images);
    after a successful ingest it trains on the 330, as a new run with their version."""
    data, art = tmp_path / "data", Artifacts(tmp_path / "artifacts")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FAST))
    for label_dir in sorted(p for p in digits_folder.iterdir() if p.is_dir()):
        (data / label_dir.name).mkdir(parents=True)
        for image in sorted(label_dir.iterdir())[:30]:
            shutil.copy2(image, data / label_dir.name / image.name)
    assert ingest_cli(data, art.root, cwd=tmp_path).returncode == 0
    old = lineage.dvc_dir_md5(lineage.folder_hashes(data))
    for label_dir in sorted(p for p in digits_folder.iterdir() if p.is_dir()):
        for image in sorted(label_dir.iterdir())[30:33]:
            shutil.copy2(image, data / label_dir.name / image.name)
    failed = ingest_cli(data, art.root, "-S", "data.resolution=64", cwd=tmp_path, file_limit=2**20)
    assert failed.returncode == 2, failed.stderr[-2000:]

    params, client = fast_params(train={"epochs": 1}), MlflowClient()
    first = pipeline.train(params, art, show=False)
    assert len(checkpoint.load(art.published.checkpoint)["assignments"]) == 300
    assert client.get_run(first.run_id).data.tags["data_md5"] == old

    assert ingest_cli(data, art.root, cwd=tmp_path).returncode == 0
    new = lineage.dvc_dir_md5(lineage.folder_hashes(data))
    second = pipeline.train(params, art, show=False)  # not a continuation of the 300's run
    assert len(checkpoint.load(art.published.checkpoint)["assignments"]) == 330
    assert second.run_id != first.run_id and second.resumed_from == 0
    run = client.get_run(second.run_id)
    assert run.data.tags["data_md5"] == new != old
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [new]


@pytest.fixture
def project(tmp_path: Path, digits_folder: Path) -> Path:
    """A git repo with 300 real digits in data/, pinned by a data.dvc written by the real dvc."""
    require_dvc()
    for label_dir in sorted(p for p in digits_folder.iterdir() if p.is_dir()):
        (tmp_path / "data" / label_dir.name).mkdir(parents=True)
        for image in sorted(label_dir.iterdir())[:30]:
            shutil.copy2(image, tmp_path / "data" / label_dir.name / image.name)
    # a constant learning rate: a longer run may then resume a shorter one's checkpoint exactly
    raw = {**FAST, "train": {**FAST["train"], "schedule": "constant"}, "eval": {"probe_epochs": 30}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / ".gitignore").write_text("/data/\n/artifacts/\n/mlflow.db\n/mlruns/\n")
    git("init", "-q", cwd=tmp_path)
    dvc_add(tmp_path, "data")
    git("add", "-A", cwd=tmp_path)
    git("commit", "-q", "-m", "data", cwd=tmp_path)
    return tmp_path


def deepcluster(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store
    done = run_cli(*args, cwd=cwd, env=env)  # sqlite:///mlflow.db in cwd
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_cli_training_is_an_mlflow_run(project: Path) -> None:
    deepcluster("run", "data", "--quiet", "-S", "train.epochs=1", cwd=project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_file = project / "artifacts/train/mlflow_run.json"
    first = client.get_run(json.loads(run_file.read_text())["run_id"])
    # auto: grey digits (no Sobel); v2 clusters in one level, every epoch
    resolved = {"model.sobel": False, "cluster.super_clusters": 1, "cluster.reassign_every": 1}
    params = load_params(project / "params.yaml", {"train.epochs": 1, **resolved})
    assert first.data.params == {k: str(v) for k, v in params.flat().items()}
    [loss] = epochs.metrics({"loss": 0.0})  # its MLflow name
    assert [m.step for m in client.get_metric_history(first.info.run_id, loss)] == [1]
    data_md5 = lineage.recorded_md5(project / "data.dvc")[0]
    (dataset,) = first.inputs.dataset_inputs
    assert dataset.dataset.digest == data_md5
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    tags = first.data.tags
    assert tags["data_md5"] == data_md5 and tags["data_tracked"] == "true"
    assert tags["git_commit"] == git("rev-parse", "HEAD", cwd=project)
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]
    assert first.info.status == "FINISHED" and "eval/nmi" in first.data.metrics

    # a longer run resumes the checkpoint: a new run (other params) that shows every epoch
    deepcluster("train", "--quiet", "-S", "train.epochs=2", cwd=project)
    second = client.get_run(json.loads(run_file.read_text())["run_id"])
    assert second.info.run_id != first.info.run_id
    assert second.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(second.info.run_id, loss)] == [1, 2]
    assert second.data.tags["data_md5"] == data_md5
    experiment = client.get_experiment_by_name("deepcluster")
    assert len(client.search_runs([experiment.experiment_id])) == 2

    # MLflow's charts: a section per prefix before the last "/", sections in name order, the
    # unprefixed ones after them; the first section must be the curves, not one-value figures
    sections = sorted({key.rpartition("/")[0] for key in second.data.metrics} - {"", "system"})
    first_section = {key for key in second.data.metrics if key.startswith(sections[0] + "/")}
    per_epoch = epochs.metrics({field.name: 1.0 for field in fields(epochs.EpochStats)})
    assert loss in first_section and first_section <= per_epoch.keys()


def test_runs_are_named_sourced_and_stored_beside_the_database(project: Path) -> None:
    """Run from a sub-folder: the store is the project's mlflow.db, the artifacts go beside it
    (not to ./mlruns of the working directory), the run has a readable name and a source, and
    the experiment is a classic ML one."""
    elsewhere = project / "notebooks"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a short run still gets samples
    args = ["run", "../data", "--quiet", "-S", "train.epochs=2", "-a", "../artifacts"]
    done = run_cli(*args, "-p", "../params.yaml", cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("deepcluster")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert any((project / "mlartifacts").rglob("metrics.json"))  # evaluate's artifacts
    data_md5 = lineage.recorded_md5(project / "data.dvc")[0]
    assert re.fullmatch(rf"v2 \d{{4}}-\d\d-\d\d \d\d:\d\d data {data_md5[:8]}",
                        run.info.run_name), run.info.run_name  # fmt: skip
    assert run.data.tags["mlflow.source.name"] == "deepcluster train"
    assert any(key.startswith("system/") for key in run.data.metrics)  # CPU, memory meanwhile


def test_an_experiment_from_before_the_tag_becomes_a_classic_one(tmp_path, monkeypatch) -> None:
    """A store whose experiment predates the experimentKind tag gets it on the next run; the
    links the project prints open MLflow 3's UI in its machine-learning view."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.use_store()
    client = MlflowClient(uri)
    old = client.create_experiment(tracking.EXPERIMENT)
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.experiment_id() == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    link = tracking.ui_link("http://127.0.0.1:5000/", f"experiments/{old}")
    assert link == f"http://127.0.0.1:5000/#/experiments/{old}?workflowType=machine_learning"


def test_predict_without_a_store_says_so_at_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = run_cli("predict", "anything.png", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "error: no MLflow store at" in done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_fresh_store_opened_by_two_processes_at_once(tmp_path: Path) -> None:
    """Both processes create the tables of one new mlflow.db at the same moment: both succeed."""
    probe = (
        "import os, sys; from deepcluster import tracking; os.chdir(sys.argv[1]); "
        "tracking.use_store(); print(tracking.experiment_id())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ssl")}
    for attempt in range(3):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", probe, str(folder)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=120) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        assert outputs[0][0] == outputs[1][0]  # one experiment, seen by both
