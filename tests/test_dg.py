"""The project is one `dg` understands: `dg check defs` and `dg list defs` load the code location
from pyproject.toml's [tool.dg], as `dg dev` (and `python -m orchestration dev`) do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.definitions import defs

pytestmark = pytest.mark.slow  # dg loads the code location in a subprocess

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dg(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(BIN.parent), "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(
        [str(BIN / "dg"), *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dg_check_defs_passes_without_warnings() -> None:
    done = dg("check", "defs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr
    assert "Warning" not in done.stderr and "does not match" not in done.stderr


def test_dg_list_defs_shows_every_asset_job_and_sensor() -> None:
    done = dg("list", "defs", "--json")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    graph = defs.resolve_asset_graph()
    expected = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {a["asset_key"] for a in listed["assets"]} == expected
    assert {"deepcluster_job", "new_images_job"} <= {j["name"] for j in listed["jobs"]}
    assert {"data_version_sensor", "inbox_sensor"} <= {s["name"] for s in listed["sensors"]}
