"""`python -m orchestration dev` as a user starts it: launch the whole job through GraphQL, as the UI does, and read
the materialisations and check results back through the same API."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.orchestration_fixtures import CHECKS_BY_ASSET, MATERIALISED, fast_run_config

pytestmark = pytest.mark.slow  # a live dg dev

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message stack }
  }
}"""

RUN_STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } }
}"""

MATERIALIZATION = """
query Latest($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          label
          ... on FloatMetadataEntry { floatValue }
          ... on IntMetadataEntry { intValue }
          ... on MarkdownMetadataEntry { mdStr }
        }
      }
    }
  }
}"""

CHECK_EXECUTIONS = """
query Checks($key: AssetKeyInput!, $name: String!) {
  assetCheckExecutions(assetKey: $key, checkName: $name, limit: 1) {
    runId
    status
    evaluation { success }
  }
}"""

LOCATION = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GraphQL:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"

    def __call__(self, query: str, **variables) -> dict:
        response = requests.post(
            self.url, json={"query": query, "variables": variables}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]


def wait_for_location(gql: GraphQL, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"dagster dev exited:\n{log.read_text()[-3000:]}"
        try:
            entries = gql(LOCATION)["workspaceOrError"]["locationEntries"]
        except requests.RequestException:
            entries = []
        loaded = [e for e in entries if e["locationOrLoadError"]]
        if loaded:
            assert loaded[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", loaded[0]
            return
        time.sleep(1)
    pytest.fail(f"code location not loaded in {timeout}s:\n{log.read_text()[-3000:]}")


def wait_for_run(gql: GraphQL, run_id: str, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = gql(RUN_STATUS, runId=run_id)["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(2)
    pytest.fail(f"run {run_id} still running after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def dagster_dev(digits_subset: Path, tmp_path: Path):
    """`python -m orchestration dev` (`dg dev` on DAGSTER_HOME) on a free port, with its instance
    and outputs in tmp_path."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    paths = [str(ROOT / "ssl"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "DEEPCLUSTER_DATA": str(digits_subset),
        "DEEPCLUSTER_ARTIFACTS": str(tmp_path / "artifacts"),
        "DEEPCLUSTER_DVC_FILE": str(tmp_path / "data.dvc"),
        "DEEPCLUSTER_DEVICE": "cpu",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestration",
                "dev",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=tmp_path,  # any folder: the command finds the project itself
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the webserver, daemon, code server
        )
    try:
        gql = GraphQL(port)
        wait_for_location(gql, server, log, timeout=180)
        yield gql, tmp_path, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def metadata(entries: list[dict]) -> dict:
    return {e["label"]: e.get("floatValue", e.get("intValue", e.get("mdStr"))) for e in entries}


def test_whole_job_through_graphql(dagster_dev) -> None:
    gql, tmp_path, log = dagster_dev
    params = {
        "selector": {
            "repositoryLocationName": "deepcluster",
            "repositoryName": "__repository__",
            "jobName": "deepcluster_job",
        },
        "runConfigData": fast_run_config(),
    }
    launched = gql(LAUNCH, params=params)["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    assert wait_for_run(gql, run_id, log, timeout=420) == "SUCCESS", log.read_text()[-3000:]

    for asset in MATERIALISED:
        found = gql(MATERIALIZATION, key={"path": [asset]})["assetOrError"]["assetMaterializations"]
        assert found and found[0]["runId"] == run_id, asset
    report = metadata(
        gql(MATERIALIZATION, key={"path": ["eval_report"]})["assetOrError"][
            "assetMaterializations"
        ][0]["metadataEntries"]
    )
    assert 0 < report["nmi"] <= 1
    assert "data:image/png;base64," in report["pictures"]
    for asset, names in CHECKS_BY_ASSET.items():
        for name in names:
            executions = gql(CHECK_EXECUTIONS, key={"path": [asset]}, name=name)[
                "assetCheckExecutions"
            ]
            assert executions and executions[0]["runId"] == run_id, name
            assert executions[0]["status"] == "SUCCEEDED", executions[0]
            assert executions[0]["evaluation"]["success"] is True
    assert (tmp_path / "artifacts" / "eval" / "metrics.json").is_file()
    said = log.read_text()
    assert "will not be used" not in said and "temporary directory" not in said, said[:3000]
