"""`deepcluster train --nproc 2`: two processes under torchrun (gloo on the CPU) train one model,
resume after a kill exactly as an uninterrupted two-process run ends, and learn what the
one-process run learns."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deepcluster import checkpoint, pipeline
from deepcluster.paths import Artifacts

from .conftest import FAST, ROOT, fast_params

pytestmark = [pytest.mark.slow, pytest.mark.numerics]  # torchrun processes training together

EPOCHS = 3


def _train(folder: Path, *args: str, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ssl")}
    command = [sys.executable, "-m", "deepcluster.cli", "train", "--nproc", "2", *args]
    if not wait:
        return subprocess.Popen(
            command, cwd=folder, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def folders(ingested: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three projects on the ingested digits: one process, two processes, two stopped."""
    out = {}
    for name in ("one", "two", "stopped"):
        folder = tmp_path_factory.mktemp(name)
        (folder / "params.yaml").write_text(
            yaml.safe_dump({**FAST, "train": {**FAST["train"], "epochs": EPOCHS}})
        )
        shutil.copytree(ingested.root, folder / "artifacts")
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def two_processes(folders: dict[str, Path]) -> dict:
    done = _train(folders["two"])
    assert done.returncode == 0, done.stderr[-3000:]
    state = checkpoint.load(folders["two"] / "artifacts/train/checkpoint.pt")
    return {"stderr": done.stderr, "state": state}


def test_two_processes_train_one_model(two_processes: dict) -> None:
    lines = two_processes["stderr"].splitlines()
    assert sum(line.startswith(f"epoch {EPOCHS}/{EPOCHS}") for line in lines) == 1  # rank 0 speaks
    state = two_processes["state"]
    assert state["epoch"] == EPOCHS and len(state["torch_rng"]) == 2  # each rank's random state


def test_a_killed_two_process_run_resumes_to_the_same_model(folders, two_processes) -> None:
    folder = folders["stopped"]
    process = _train(folder, wait=False)
    while not process.stderr.readline().startswith("epoch 1/"):
        assert process.poll() is None, "training ended before its first epoch"
    os.killpg(process.pid, signal.SIGTERM)  # as a scheduler stops a job: the whole group
    process.communicate(timeout=120)
    assert process.returncode != 0 and not (folder / "artifacts/train/model.pt").exists()
    assert (folder / "artifacts/.staging/train/checkpoint.pt").exists()

    resumed = _train(folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = two_processes["state"]
    b = checkpoint.load(folder / "artifacts/train/checkpoint.pt")
    np.testing.assert_array_equal(a["assignments"], b["assignments"])
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0, msg=name)


def test_two_processes_learn_and_agree_with_one(folders, two_processes) -> None:
    """The same optimisation split over two processes: its clusters (at the training k) beat the
    untrained network's against the labels, and agree with the one-process run's. (At this
    budget of a few seconds the features do not yet beat it on kNN: test_learning holds that.)"""
    from deepcluster.cluster import nmi

    params = fast_params(train={"epochs": EPOCHS})
    two = Artifacts(folders["two"] / "artifacts")
    pipeline.features(two, params, show=False)
    pipeline.cluster(two, params)
    m = pipeline.evaluate_step(two, params, show=False)
    assert m["nmi_k"] > m["nmi_k_random_init"] + 0.05, (m["nmi_k"], m["nmi_k_random_init"])

    one = Artifacts(folders["one"] / "artifacts")
    pipeline.train(params, one, show=False)
    one_ids = checkpoint.load(one.published.checkpoint)["assignments"].numpy()
    assert nmi(one_ids, two_processes["state"]["assignments"].numpy()) > 0.5


DEEPER = {"model": {"method": "deepercluster"}, "cluster": {"super_clusters": 3, "reassign_every": 2}}


def test_two_processes_train_deepercluster_as_one(ingested: Artifacts, tmp_path: Path) -> None:
    """DeeperCluster under torchrun: level 2 of the k-means on both ranks, sub-heads that some
    steps leave without gradient (DDP told so). The first clustering, of the same untrained
    network, is the one-process run's; the trained clusters agree with it as v1's do."""
    from deepcluster.cluster import nmi

    sections = {name: {**FAST.get(name, {}), **DEEPER.get(name, {})} for name in {*FAST, *DEEPER}}
    sections["train"] = {**sections["train"], "epochs": EPOCHS}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(sections))
    shutil.copytree(ingested.root, tmp_path / "artifacts")
    done = _train(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = checkpoint.load(tmp_path / "artifacts/train/checkpoint.pt")
    assert len(two["torch_rng"]) == 2 and two["heads"] == [12] + [10] * 12

    one = Artifacts(tmp_path / "one")
    shutil.copytree(ingested.root, one.root)
    params = fast_params(**{**DEEPER, "train": {"epochs": EPOCHS}})
    alone = pipeline.train(params, one, show=False)
    assert two["history"][0]["kmeans_loss"] == pytest.approx(alone.history[0].kmeans_loss, rel=1e-4)
    ids = checkpoint.load(one.published.checkpoint)["assignments"].numpy()
    assert nmi(ids, two["assignments"].numpy()) > 0.5
