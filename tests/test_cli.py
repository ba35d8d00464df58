"""The `deepcluster` command: the whole pipeline from an image folder, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import polars as pl
import yaml

from .conftest import FAST
from .conftest import run_cli as deepcluster

ROOT = Path(__file__).resolve().parents[1]


def test_run_goes_from_an_image_folder_to_metrics(tmp_path: Path, digits_folder: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FAST))
    result = deepcluster("run", str(digits_folder), "--quiet", "-S", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "knn_top1" in result.stdout

    art = tmp_path / "artifacts"
    table = pl.read_parquet(art / "cluster" / "assignments.parquet")
    assert table.height == 1797 and table["cluster"].n_unique() == FAST["cluster"]["k"]
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    required = {
        "nmi",
        "ari",
        "accuracy",
        "nmi_random_init",
        "nmi_pixels",
        "knn_top1",
        "knn_top1_random_init",
        "linear_top1",
        "linear_top1_random_init",
    }
    assert required <= metrics.keys()
    assert all(0 <= metrics[key] <= 1 for key in required)
    history = json.loads((art / "eval" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1]
    assert {"loss", "nmi_prev", "nmi_labels", "seconds"} <= history[0].keys()
    for picture in ("curves.png", "cluster_sizes.png", "clusters.png"):
        assert (art / "eval" / picture).stat().st_size > 1000, picture
    assert len(list((art / "eval" / "grids").glob("cluster_*.png"))) == FAST["cluster"]["k"]


def test_user_errors_are_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(FAST))
    cases = [
        (["ingest", "no/such/folder"], "error: data folder not found: no/such/folder"),
        (["train", "-S", "train.lr=-3"], "error: train.lr = -3: must be > 0"),
        (["train", "--params", "missing.yaml"], "error: missing.yaml: parameter file not found"),
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
    for command in ("", "sample-data", "ingest", "train", "features", "cluster", "evaluate", "run"):
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
