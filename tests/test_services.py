"""The deployment's services, for real, on 127.0.0.1: the whole Dagster graph runs with its instance
in PostgreSQL (deploy/dagster.yaml), its MLflow runs and registry on an MLflow server backed by
PostgreSQL, and the model's files in an S3 bucket; DVC pushes and pulls the data through the same S3
endpoint. Only configuration changes from `make demo`: environment variables and dagster.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests import services
from tests.conftest import ROOT, fast_params
from tests.orchestration_fixtures import CHECK_NAMES, MATERIALISED
from tests.test_dvc_pipeline import Repo, copy_working_tree, require_dvc, tree_digest

pytestmark = pytest.mark.slow  # PostgreSQL, S3 and MLflow servers

BUCKET = "deepcluster"
MLFLOW_ARTIFACTS = "mlartifacts"  # prefix in the bucket, as in deploy/compose.yaml
DVC_PREFIX = "dvc"


def found(tree, key: str):
    """The value of the first `key` anywhere in a JSON tree (Dagster's serialised events)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    for item in tree if isinstance(tree, list) else []:
        value = found(item, key)
        if value is not None:
            return value
    return None


def require_servers() -> None:
    reason = services.missing_servers()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI installs them (make services-deps); never skip silently there
    pytest.skip(reason)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    require_servers()
    with services.running_s3(tmp_path_factory.mktemp("s3")) as store:
        # the bucket as compose's one-shot `buckets` service makes it
        script = [sys.executable, str(ROOT / "deploy" / "s3_bucket.py"), BUCKET]
        made = subprocess.run(
            script, env={**os.environ, **store.env()}, capture_output=True, text=True, check=False
        )
        assert made.returncode == 0 and f"s3://{BUCKET} created" in made.stdout, made.stderr
        yield store


@pytest.fixture(scope="module")
def stack(s3: services.S3, tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL with a database each for Dagster and MLflow, and the MLflow server on it."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    with services.running_postgres(["dagster", "mlflow"]) as pg:
        backend = pg.url("mlflow", scheme="postgresql+psycopg")
        artifacts = f"s3://{BUCKET}/{MLFLOW_ARTIFACTS}"
        with services.running_mlflow(folder, backend, artifacts, s3) as tracking_uri:
            yield pg, s3, tracking_uri


def deploy_env(pg: services.Postgres, tracking_uri: str, home: Path, tmp: Path) -> dict[str, str]:
    """The variables deploy/compose.yaml gives the code location, pointing at the local servers."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'ssl'}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",  # a shared two-core machine
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_HOST": pg.host,
        "DAGSTER_POSTGRES_PORT": str(pg.port),
        "DAGSTER_POSTGRES_USER": pg.user,
        "DAGSTER_POSTGRES_PASSWORD": pg.password,
        "DAGSTER_POSTGRES_DB": "dagster",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "DEEPCLUSTER_MLFLOW_UI": tracking_uri,
        "DEEPCLUSTER_DVC_FILE": str(tmp / "data.dvc"),  # none: the observation hashes the listing
        "DEEPCLUSTER_DEVICE": "cpu",
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(name, None)  # the client reaches artifacts only through the MLflow server
    return env


@pytest.fixture(scope="module")
def deployed(stack, digits_subset: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python -m orchestration materialize` (what `make demo` runs) against the services."""
    pg, s3, tracking_uri = stack
    tmp = tmp_path_factory.mktemp("deployed")
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(fast_params().to_dict(), sort_keys=False))
    env = deploy_env(pg, tracking_uri, home, tmp)
    command = [sys.executable, "-m", "orchestration", "materialize", "--params", str(params),
               "--data", str(digits_subset), "--artifacts", str(tmp / "artifacts")]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"materialize failed:\n{output[-4000:]}"
    # two epochs need not beat the baselines (the promotion gate: tests/test_registry.py); these
    # tests are about where the registry lives and loading its champion, so version 1 holds it
    client = MlflowClient(tracking_uri)
    if "champion" not in client.get_model_version("deepcluster", "1").aliases:
        client.set_registered_model_alias("deepcluster", "champion", "1")
    return pg, s3, tracking_uri, tmp, env, output


def test_the_run_and_its_events_are_in_postgres(deployed) -> None:
    pg, _, _, tmp, _, output = deployed
    [(run_id, status)] = pg.query(
        "dagster", "SELECT run_id, status FROM runs WHERE pipeline_name = %s", "deepcluster_job"
    )
    assert status == "SUCCESS" and f"run {run_id}: success" in output
    materialised = pg.query(
        "dagster",
        "SELECT DISTINCT asset_key FROM event_logs WHERE run_id = %s"
        " AND dagster_event_type = 'ASSET_MATERIALIZATION'",
        run_id,
    )
    assert {json.loads(key)[0] for (key,) in materialised} == set(MATERIALISED)  # ["name"]
    checks = pg.query(
        "dagster",
        "SELECT event FROM event_logs WHERE run_id = %s"
        " AND dagster_event_type = 'ASSET_CHECK_EVALUATION'",
        run_id,
    )
    assert sorted(found(json.loads(e), "check_name") for (e,) in checks) == sorted(CHECK_NAMES)
    # nothing fell back to the embedded sqlite storage
    assert not list((tmp / "dagster_home").rglob("*.db"))


def test_mlflow_runs_and_registry_are_in_postgres(deployed) -> None:
    pg, _, tracking_uri, tmp, _, _ = deployed
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("deepcluster", "champion")
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    [(status,)] = pg.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run.info.run_id)
    assert status == "FINISHED"
    aliases = pg.query(
        "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = 'deepcluster'"
    )
    assert dict(aliases) == {"candidate": int(champion.version), "champion": int(champion.version)}
    # no local store was made anywhere
    assert not [p for p in ("mlflow.db", "mlruns", "mlartifacts") if (tmp / p).exists()]


def test_model_files_are_in_the_s3_bucket(deployed) -> None:
    _, s3, _, _, _, _ = deployed
    keys = s3.keys(BUCKET, prefix=f"{MLFLOW_ARTIFACTS}/")
    names = {Path(key).name for key in keys}
    assert {"MLmodel", "model.pt", "clustering.npz", "metrics.json"} <= names, sorted(keys)[:20]


def test_the_champion_loads_from_the_registry_and_predicts(deployed, digits_subset: Path) -> None:
    """Another process, knowing only the tracking URI, loads models:/deepcluster@champion."""
    _, _, _, tmp, env, _ = deployed
    images = sorted(str(p) for p in digits_subset.rglob("*.png"))[:5]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/deepcluster@champion')\n"
        "out = model.predict(pd.DataFrame({'path': sys.argv[1:]}), params={'allow_paths': True})\n"
        "print(json.dumps({'clusters': out['cluster'].tolist(),"
        " 'dims': [len(e) for e in out['embedding']]}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *images],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    params = fast_params()
    assert len(result["clusters"]) == len(images)
    assert all(0 <= c < params.cluster.k for c in result["clusters"])
    assert result["dims"] == [params.model.embed_dim] * len(images)


def test_dvc_pushes_and_pulls_data_through_the_s3_endpoint(
    s3: services.S3, digits_subset: Path, tmp_path: Path
) -> None:
    """`dvc remote add` with an endpoint URL: the team's remote, configuration only."""
    require_dvc()
    repo = Repo(copy_working_tree(tmp_path / "clone"), tmp_path)
    repo.env.update(s3.env())  # dvc-s3 (botocore) reads the credentials from the environment
    repo.git("init", "-q")
    shutil.copytree(digits_subset, repo.path / "data")
    repo.dvc("add", "data")
    repo.dvc("remote", "add", "-d", "team", f"s3://{BUCKET}/{DVC_PREFIX}")
    repo.dvc("remote", "modify", "team", "endpointurl", s3.endpoint)
    repo.commit("data and the team's S3 remote")
    repo.dvc("push", "data.dvc")

    nfiles = yaml.safe_load((repo.path / "data.dvc").read_text())["outs"][0]["nfiles"]
    pushed = s3.keys(BUCKET, prefix=f"{DVC_PREFIX}/files/md5/")
    assert len(pushed) == nfiles + 1  # every image and the directory listing

    fresh = tmp_path / "fresh"
    repo.run("git", "clone", "-q", str(repo.path), str(fresh))
    repo.dvc("pull", "data.dvc", cwd=fresh)
    assert tree_digest(fresh / "data") == tree_digest(digits_subset)
