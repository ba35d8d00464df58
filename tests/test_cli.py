"""The `deepcluster` command: the whole pipeline from an image folder, and one-line user errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import polars as pl
import pytest
import yaml

from .conftest import FAST
from .conftest import run_cli as deepcluster

pytestmark = pytest.mark.slow  # the CLI in subprocesses

ROOT = Path(__file__).resolve().parents[1]


def test_run_goes_from_an_image_folder_to_metrics(tmp_path: Path, digits_folder: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FAST))
    result = deepcluster("run", str(digits_folder), "-S", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "knn_top1" in result.stdout
    # not a terminal: one line per epoch and per probe, no bar updates (carriage returns)
    assert "epoch 1/1" in result.stderr and "evaluate trained:" in result.stderr
    assert "\r" not in result.stderr
    assert re.search(r"time: ingest \d+ s, train \d+ s, .* evaluation \d+% of training", result.stdout)

    art = tmp_path / "artifacts"
    table = pl.read_parquet(art / "cluster" / "assignments.parquet")
    assert table.height == 1797 and table["cluster"].n_unique() == FAST["cluster"]["k"]
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    required = {
        "nmi",
        "ari",
        "accuracy",
        "accuracy_embedding",
        "nmi_random_init",
        "nmi_pixels",
        "knn_top1",
        "knn_top1_random_init",
        "linear_top1",
        "linear_top1_random_init",
    }
    assert required <= metrics.keys()
    assert all(0 <= metrics[key] <= 1 for key in required)
    shortcut = {"shortcut", "shortcut_random_init", "shortcut_pixels"}  # AMI: below 0 by chance
    assert shortcut <= metrics.keys() and all(-0.1 < metrics[key] <= 1 for key in shortcut)
    history = json.loads((art / "eval" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert {"loss", "nmi_prev", "nmi_labels", "seconds"} <= history[0].keys()
    for picture in ("curves.png", "cluster_sizes.png", "clusters.png"):
        assert (art / "eval" / picture).stat().st_size > 1000, picture
    assert len(list((art / "eval" / "grids").glob("cluster_*.png"))) == FAST["cluster"]["k"]
    assert "trained 1 epochs (model at" in result.stdout

    again = deepcluster("run", str(digits_folder), "-S", "train.epochs=1", cwd=tmp_path)
    assert "already trained:" in again.stdout and "--fresh" in again.stdout, again.stdout
    assert "epoch 1/1" not in again.stderr  # nothing trained, and the run says so
    fresh = deepcluster("train", "-S", "train.epochs=1", "--fresh", cwd=tmp_path)
    assert "epoch 1/1" in fresh.stderr and "trained 1 epochs" in fresh.stdout, fresh.stdout


def test_user_errors_are_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FAST))
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    cases = [
        (["ingest", "no/such/folder"], "error: data folder not found: no/such/folder"),
        (["train", "-S", "train.lr=-3"], "error: train.lr = -3: must be a number in (0, 100]"),
        (["train", "-S", "train.lr=inf"], "error: train.lr = 'inf': must be a number"),
        (["train", "-S", "train.lr=.inf"], "error: train.lr = inf: must be a number in (0, 100]"),
        (["train", "-S", "train.lr=[1"], "error: --set 'train.lr=[1': '[1' is not a valid value"),
        (["train", "-S", "model.embed_dim=100000000"], "model.embed_dim = 100000000: must be"),
        (["train", "-S", "train.seed=-1"], "error: train.seed = -1: must be a whole number in 0..4294967295"),
        (["train", "-S", "eval.grid_images=0"], "error: eval.grid_images = 0: must be a whole number in 1..1000"),
        (["train", "-S", "train.lr=1", "-S", "train.lr=2"], "error: --set train.lr: given twice"),
        (["train", "--params", "missing.yaml"], "error: missing.yaml: parameter file not found"),
        (["train", "--params", "list.yaml"], "the top level must be a mapping of sections"),
        (["train", "--params", "binary.yaml"], "not a text file (expected YAML)"),
        (["train", "-a", "a-file"], "error: --artifacts a-file: exists and is not a folder"),
        (["ingest", "-a", "/proc/deepcluster"], "error: cannot use /proc/deepcluster"),
        (["features"], "run `deepcluster train` first"),
        (["sample-data", "cifar", "x"], "error: unknown sample set 'cifar'"),
    ]
    for args, message in cases:
        result = deepcluster(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_help_everywhere(tmp_path: Path) -> None:
    commands = ("", "sample-data", "ingest", "train", "features", "cluster", "evaluate", "run")
    for command in (*commands, "register", "predict", "curate"):
        result = deepcluster(*([command] if command else []), "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Usage" in result.stdout, command


def test_import_ssl_is_still_the_standard_library() -> None:
    assert not (ROOT / "ssl" / "__init__.py").exists()
    probe = "import ssl, sys; print(ssl.__file__); print(ssl.create_default_context() is not None)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    path, ok = result.stdout.split()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(path).resolve() == stdlib / "ssl.py" and ok == "True"


def test_auto_values_are_resolved_printed_and_recorded(tmp_path: Path, digits_folder: Path) -> None:
    """No params.yaml and no flags: the built-in defaults, `auto` resolved from the images."""
    result = deepcluster("ingest", str(digits_folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "auto: data.resolution = 16 (median shorter side 8 px" in result.stderr
    assert "1797 images ingested at 16 px" in result.stdout
    assert "auto: cluster.k" not in result.stderr  # said once, by the training that uses it


def test_sigterm_stops_training_keeps_the_model_and_kills_the_run(
    tmp_path: Path, digits_folder: Path
) -> None:
    import os
    import signal
    import time

    from mlflow.tracking import MlflowClient

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FAST))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's store
    assert deepcluster("ingest", str(digits_folder), cwd=tmp_path, env=env).returncode == 0
    assert deepcluster("train", "-S", "train.epochs=1", cwd=tmp_path, env=env).returncode == 0
    model = (tmp_path / "artifacts/train/model.pt").read_bytes()

    env["PYTHONPATH"] = str(ROOT / "ssl")
    process = subprocess.Popen(
        [sys.executable, "-m", "deepcluster.cli", "train", "-S", "train.epochs=50", "--fresh"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not process.stderr.readline().startswith("epoch 1/50"):  # the first finished epoch
        assert process.poll() is None, "training ended before its first epoch"
    process.send_signal(signal.SIGTERM)
    began = time.monotonic()
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130 and time.monotonic() - began < 30
    assert "stopped (signal SIGTERM)" in rest and "Traceback" not in rest
    assert (tmp_path / "artifacts/train/model.pt").read_bytes() == model  # the last good model
    staged = tmp_path / "artifacts/.staging/train"
    assert (staged / "checkpoint.pt").exists()
    run_id = json.loads((staged / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"
