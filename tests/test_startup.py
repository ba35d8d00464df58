"""Start-up stays light: importing the pipeline or the CLI, and running ingest, load none of the
heavy libraries (MLflow ~4 s, scikit-learn, matplotlib, Dagster; torch for ingest), each checked
in a fresh interpreter. A property of the import graph, not a timing (benchmarks/startup.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("mlflow", "matplotlib", "sklearn", "dagster", "torch")
REPORT = "import json, sys; print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))"


def heavy_modules_after(code: str, cwd: Path) -> list[str]:
    """The HEAVY modules loaded once `code` has run in a fresh interpreter."""
    script = f"{code}\n{REPORT.format(heavy=HEAVY)}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ssl")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["deepcluster.pipeline", "deepcluster.cli"])
def test_importing_loads_no_heavy_library(module: str, tmp_path: Path) -> None:
    assert heavy_modules_after(f"import {module}", tmp_path) == []


def test_ingest_loads_no_heavy_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (12, 12), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    ingest = (
        "from deepcluster import cli\n"
        "cli.app(['ingest', 'images', '--artifacts', 'art', '-q'], standalone_mode=False)"
    )
    assert heavy_modules_after(ingest, tmp_path) == []
    assert (tmp_path / "art" / "ingest").is_dir()  # the ingest ran, it did not stop early
