"""The pipeline as DVC stages, run by the real `dvc` in a temporary git clone of this working tree.

One clone, one full `dvc repro` on the real digits sample (tiny params), a real local remote folder,
the default MLflow store (`mlflow.db` in the clone). The tests share that clone and run in file
order: the last one changes a parameter. DVC lives in its own environment (.dvc-venv, see
docs/tracking.md); the stages call this checkout's `deepcluster` CLI through a shim on PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from deepcluster import dvcstages, promotion
from deepcluster.config import load_params
from deepcluster.paths import PLOTS_PAGE, VEGA_SCRIPTS

from .conftest import TEST_COMPUTE

pytestmark = pytest.mark.slow  # dvc repro in a temporary clone

ROOT = Path(__file__).resolve().parents[1]
DVC = ROOT / ".dvc-venv" / "bin" / "dvc"
DAGSTER_ASSETS = [
    "image_manifest", "image_cache", "checkpoint", "features", "cluster_assignments",
    "eval_report", "registered_model", "curated_subset",
]  # fmt: skip
STAGES = ["ingest", "train", "features", "cluster", "evaluate", "register", "curate", "dagster"]
# small enough for two busy CPU cores; the code path is the one `dvc repro` runs with params.yaml
TINY = {
    "data": {"resolution": 16},
    "model": {"embed_dim": 64},
    "cluster": {"k": 20, "pca_dim": 16},
    "train": {"epochs": 2, "batch_size": 64},
    "eval": {"probe_epochs": 30, "grid_clusters": 4, "grid_images": 4},
    "compute": TEST_COMPUTE,  # the numeric path the suite runs on (docs/testing.md)
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def require_dvc() -> None:
    if DVC.exists():
        return
    reason = f"{DVC} missing: python3 -m venv .dvc-venv && .dvc-venv/bin/pip install dvc"
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI must exercise DVC, never skip it silently
    pytest.skip(reason)


def copy_working_tree(dest: Path) -> Path:
    """Tracked and untracked-but-not-ignored files of this checkout, committed in a new repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = ROOT / relative
        if source.is_file():  # tracked files deleted in the working tree are listed too
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / relative)
    return dest


class Repo:
    """A clone with helpers to run git, dvc and the project's CLI in it."""

    first: str  # output of the first `dvc repro`
    second: str  # output of the second one
    head_at_repro: str  # the commit the first repro ran at

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path = path
        self.home = scratch / "home"  # `~` of the dvc commands: the default remote lands here
        bin_dir = scratch / "bin"
        for folder in (self.home, bin_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # `.venv/bin` first on PATH, as the README says: the CLI and the project's python
        shims = {"deepcluster": '-m deepcluster.cli "$@"', "python": '"$@"'}
        for name, args in shims.items():
            shim = bin_dir / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {args}\n')
            shim.chmod(0o755)
        self.env = {
            **os.environ,
            **GIT_IDENTITY,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            # the clone's library and code location, which the stages depend on
            "PYTHONPATH": f"{path / 'ssl'}{os.pathsep}{path}",
            "DAGSTER_HOME": str(path / ".dagster"),
            "DEEPCLUSTER_DVC": str(DVC),  # the clone has no .dvc-venv of its own
            "DVC_NO_ANALYTICS": "1",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)  # MLflow's default: sqlite:///mlflow.db here

    def run(self, *args: str, cwd: Path | None = None, home: bool = False) -> str:
        env = {**self.env, "HOME": str(self.home)} if home else self.env
        done = subprocess.run(
            args, cwd=cwd or self.path, env=env, capture_output=True, text=True, check=False
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{output[-4000:]}"
        return output

    def dvc(self, *args: str, cwd: Path | None = None) -> str:
        return self.run(str(DVC), *args, cwd=cwd, home=True)

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def write_params(self, overrides: dict) -> None:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        for section, values in overrides.items():
            params[section].update(values)
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def dvc_outputs(repo: Path) -> list[str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    require_dvc()
    scratch = tmp_path_factory.mktemp("dvc")
    repo = Repo(copy_working_tree(scratch / "clone"), scratch)
    repo.git("init", "-q")
    repo.write_params(TINY)
    repo.commit("working tree with tiny params")
    repo.run("deepcluster", "sample-data", "digits", "data")
    # what `make demo` does after exporting: cache the export; data.dvc changes only if bytes differ
    repo.dvc("commit", "--force", "data.dvc")
    repo.head_at_repro = repo.git("rev-parse", "HEAD").strip()
    repo.first = repo.dvc("repro")
    repo.second = repo.dvc("repro")
    repo.commit("dvc.lock after the first repro")
    return repo


def test_a_fresh_export_matches_the_committed_data_dvc(repo: Repo) -> None:
    assert repo.git("status", "--porcelain", "data.dvc") == ""
    committed = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert committed["nfiles"] == 1797 and committed["md5"].endswith(".dir")


def test_repro_runs_every_stage_then_nothing(repo: Repo) -> None:
    assert stages_run(repo.first) == STAGES
    assert "epoch 1/2" in repo.first and "epoch 2/2" in repo.first  # progress, one line each
    assert "\r" not in repo.first  # no bar updates in a log
    assert stages_run(repo.second) == []
    assert "Data and pipelines are up to date." in repo.second
    registered = json.loads((repo.path / "artifacts/register/registered.json").read_text())
    # champion only if two epochs beat both baselines (promotion's gate); the first version else
    metrics = json.loads((repo.path / "artifacts/eval/metrics.json").read_text())
    shortfalls = promotion.baseline_shortfalls(metrics)
    assert registered["version"] == "1"
    assert registered["aliases"] == ["candidate"] + ([] if shortfalls else ["champion"])


def test_metrics_and_plots_show(repo: Repo) -> None:
    (workspace,) = json.loads(repo.dvc("metrics", "show", "--json")).values()
    figures = {Path(path).stem: file["data"] for path, file in workspace["data"].items()}
    assert {"nmi", "knn_top1", "linear_top1", "shortcut"} <= set(figures)
    assert set(figures["nmi"]) == {"trained", "random_init", "pixels"}
    assert 0 < figures["nmi"]["trained"] <= 1
    everything = json.loads((repo.path / "artifacts/eval/metrics.json").read_text())
    assert figures["linear_top1"]["pixels"] == everything["linear_top1_pixels"]
    # a table of figures by model and baselines that an 80-column terminal shows whole
    table = repo.dvc("metrics", "show").splitlines()
    assert table[0].split() == ["Path", "pixels", "random_init", "trained"], table
    rows = [line for line in table if line.startswith("artifacts/eval/scores/")]
    assert len(rows) == len(figures) and max(map(len, table)) <= 80, table
    out = repo.path.parent / "plots"
    repo.dvc("plots", "show", "-o", str(out))
    page = (out / "index.html").read_text()
    for title in ("Training loss", "NMI(t-1, t)", "Cluster sizes"):
        assert title in page
    assert {p.name for p in (out / "static").iterdir()} >= {
        "workspace_artifacts_eval_curves.png",
        "workspace_artifacts_eval_clusters.png",
    }


def vega_package() -> Path:
    """The installed django-js-lib-vega-embed of .dvc-venv (`make install`), as make finds it."""
    probe = "import js_lib_vega_embed as m; print(m.__path__[0])"
    found = subprocess.run(
        [str(DVC.parent / "python"), "-c", probe], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        reason = ".dvc-venv lacks django-js-lib-vega-embed: make install"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Path(found.stdout.strip())


def test_plots_show_draws_its_charts_offline(repo: Repo) -> None:
    """make install's page and setting: the chart scripts inlined, nothing fetched."""
    package = vega_package()
    dvcstages.write_plots_page(package, repo.path / PLOTS_PAGE)
    setting = PLOTS_PAGE.relative_to(".dvc").as_posix()  # DVC reads it relative to .dvc/
    repo.dvc("config", "--local", "plots.html_template", setting)
    out = repo.path.parent / "offline"
    repo.dvc("plots", "show", "-o", str(out))
    page = (out / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)  # no CDN, no file
    for script in VEGA_SCRIPTS:  # vega, vega-lite and vega-embed, whole
        assert (package / script).read_text(encoding="utf-8") in page, script
    assert page.count("vegaEmbed('#") == 3  # the three charts of dvc.yaml
    history = json.loads((repo.path / "artifacts/eval/history.json").read_text())
    for row in history:  # the data are in the page: each epoch's loss, as DVC writes numbers
        assert f'"loss": {json.dumps(row["loss"])}' in page


def test_training_is_an_mlflow_run_in_the_default_store(repo: Repo) -> None:
    client = MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    run_id = json.loads((repo.path / "artifacts/train/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    # auto: grey digits; v2 clusters in one level, every epoch
    resolved = {"model.sobel": False, "cluster.super_clusters": 1, "cluster.reassign_every": 1}
    params = load_params(repo.path / "params.yaml", resolved)
    assert run.data.params == {k: str(v) for k, v in params.flat().items()}
    steps = [m.step for m in client.get_metric_history(run_id, "epoch/loss")]
    assert steps == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "epoch/nmi_prev")] == [2]
    data_md5 = yaml.safe_load((repo.path / "data.dvc").read_text())["outs"][0]["md5"]
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == data_md5 == run.data.tags["data_md5"]
    assert run.data.tags["data_tracked"] == "true"
    assert run.data.tags["git_commit"] == repo.head_at_repro
    assert run.data.metrics["eval/nmi"] > 0
    assert "eval/metrics.json" in {a.path for a in client.list_artifacts(run_id, "eval")}
    assert client.get_model_version("deepcluster", "1").run_id == run_id


def test_push_then_pull_into_a_fresh_clone_restores_everything(repo: Repo) -> None:
    repo.dvc("push")
    assert (repo.home / ".cache/deepcluster/dvc-remote/files/md5").is_dir()  # the default remote
    fresh = repo.path.parent / "fresh"
    repo.run("git", "clone", "-q", str(repo.path), str(fresh))
    repo.dvc("pull", cwd=fresh)
    for path in ["data", *dvc_outputs(repo.path)]:
        original, restored = repo.path / path, fresh / path
        if original.is_dir():
            assert tree_digest(restored) == tree_digest(original), path
        else:
            assert restored.read_bytes() == original.read_bytes(), path
    assert "Data and pipelines are up to date." in repo.dvc("status", cwd=fresh)


def test_a_changed_param_reruns_only_the_stages_downstream(repo: Repo) -> None:
    # `dvc exp run -S` parses overrides with hydra (antlr 4.9): the DVC side of the antlr clash
    output = repo.dvc("exp", "run", "-S", "eval.knn_k=5")
    assert stages_run(output) == ["evaluate", "register", "dagster"]
    registered = json.loads((repo.path / "artifacts/register/registered.json").read_text())
    # same model, same NMI: a tie does not move `champion` (nor does the baselines' gate)
    assert registered["version"] == "2" and registered["aliases"] == ["candidate"]
    client = MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    first = client.get_model_version("deepcluster", "1")
    assert registered["champion_before"] == ("1" if "champion" in first.aliases else None)


def test_registering_an_unchanged_model_adds_no_version(repo: Repo) -> None:
    before = json.loads((repo.path / "artifacts/register/registered.json").read_text())
    output = repo.dvc("repro", "--force", "--single-item", "register")
    assert stages_run(output) == ["register"]
    after = json.loads((repo.path / "artifacts/register/registered.json").read_text())
    assert after["version"] == before["version"]
    client = MlflowClient(f"sqlite:///{repo.path / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'deepcluster'")
    assert max(int(v.version) for v in versions) == int(before["version"])


def test_after_a_repro_dagster_shows_no_asset_stale(repo: Repo) -> None:
    from dagster import AssetKey, DagsterInstance
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._core.instance.ref import InstanceRef
    from dagster._utils.test.data_versions import get_stale_status_resolver

    from orchestration.definitions import defs

    assert "recorded in the Dagster instance" in repo.first
    ref = InstanceRef.from_dir(str(repo.path / ".dagster"))
    with DagsterInstance.from_ref(ref) as instance:
        resolver = get_stale_status_resolver(instance, list(defs.assets))  # Dagster's own rule
        statuses = {name: resolver.get_status(AssetKey(name)) for name in DAGSTER_ASSETS}
    assert statuses == dict.fromkeys(DAGSTER_ASSETS, StaleStatus.FRESH)


def test_after_a_dagster_run_dvc_has_nothing_to_do(repo: Repo) -> None:
    """`make demo`'s path: the whole graph through Dagster, then `dvc status`."""
    output = repo.run(sys.executable, "-m", "orchestration", "materialize")
    assert "dvc.lock updated: dvc status is clean" in output, output[-3000:]
    assert "Data and pipelines are up to date." in repo.dvc("status")


def test_dvc_and_the_project_keep_their_own_antlr_runtime() -> None:
    require_dvc()
    probe = "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))"
    dvc_side = subprocess.run(
        [str(DVC.parent / "python"), "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    project_side = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert dvc_side.startswith("4.9."), dvc_side  # hydra/omegaconf pin it
    assert project_side.startswith("4.13."), project_side  # Dagster's selection parser needs it
