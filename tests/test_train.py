"""Training on the real digits images: resume after a stop, determinism under one seed, staging
and publishing, one writer per folder, and a head that learns in every epoch."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from deepcluster import checkpoint, data, io, lock, pipeline, tracking
from deepcluster.errors import ParamError, UserError
from deepcluster.models import build_model
from deepcluster.paths import Artifacts
from deepcluster.train import Diverged

from .conftest import fast_params

METHODS = ("deepcluster", "deepcluster-v2")


def _final(art: Artifacts) -> dict:
    return checkpoint.load(art.published.checkpoint)


def _copy_ingest(art: Artifacts, other: Artifacts) -> None:
    shutil.copytree(art.ingest_dir, other.ingest_dir)
    shutil.copytree(art.cache.parent, other.cache.parent)


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("method", METHODS)
def test_resumed_run_matches_uninterrupted_run(workspace: Artifacts, tmp_path, method) -> None:
    params = fast_params(model={"method": method}, train={"epochs": 3})
    whole = pipeline.train(params, workspace, show=False)
    assert [h.epoch for h in whole.history] == [1, 2, 3] and whole.published

    other = Artifacts(tmp_path / "stopped")
    _copy_ingest(workspace, other)
    stopped = pipeline.train(params, other, stop_after=1, show=False)
    assert len(stopped.history) == 1 and not stopped.published
    assert not other.model.exists() and other.checkpoint.exists()  # staged, not published
    resumed = pipeline.train(params, other, show=False)
    assert resumed.resumed_from == 1 and [h.epoch for h in resumed.history] == [1, 2, 3]
    assert resumed.run_id == stopped.run_id  # the same MLflow run goes on

    a, b = _final(workspace), _final(other)
    np.testing.assert_array_equal(a["assignments"], b["assignments"])
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0, msg=name)
    assert [h.loss for h in resumed.history] == pytest.approx([h.loss for h in whole.history])


@pytest.mark.slow
@pytest.mark.numerics
def test_same_seed_same_assignments_other_seed_differs(workspace: Artifacts, tmp_path) -> None:
    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        art = Artifacts(tmp_path / name)
        shutil.copytree(workspace.root, art.root)
        pipeline.train(fast_params(train={"epochs": 1, "seed": seed}), art, show=False)
        runs.append(_final(art)["assignments"].numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.slow
def test_a_staged_run_of_other_params_is_not_resumed(workspace: Artifacts) -> None:
    pipeline.train(fast_params(train={"epochs": 2}), workspace, stop_after=1, show=False)
    with pytest.raises(UserError, match="trained with other parameters.*--fresh"):
        pipeline.train(fast_params(train={"epochs": 2, "lr": 0.2}), workspace, show=False)
    fresh = pipeline.train(
        fast_params(train={"epochs": 1, "lr": 0.2}), workspace, fresh=True, show=False
    )
    assert fresh.resumed_from == 0 and fresh.published


@pytest.mark.slow
def test_constant_schedule_extends_a_finished_run_cosine_starts_anew(workspace: Artifacts) -> None:
    constant = {"schedule": "constant"}
    pipeline.train(fast_params(train={"epochs": 1, **constant}), workspace, show=False)
    longer = pipeline.train(fast_params(train={"epochs": 2, **constant}), workspace, show=False)
    assert longer.resumed_from == 1 and len(longer.history) == 2
    with pytest.raises(UserError, match="already holds 2 epochs, more than train.epochs = 1"):
        pipeline.train(fast_params(train={"epochs": 1, **constant}), workspace, show=False)
    # the cosine schedule depends on the run's length: another length is another run
    cosine = pipeline.train(fast_params(train={"epochs": 3}), workspace, show=False)
    assert cosine.resumed_from == 0 and len(cosine.history) == 3


@pytest.mark.slow
def test_a_failed_or_stopped_run_leaves_the_published_model(workspace: Artifacts) -> None:
    first = pipeline.train(fast_params(train={"epochs": 1}), workspace, show=False)
    published = {p.name: p.read_bytes() for p in workspace.train_dir.iterdir()}

    def fail_after_first(stats) -> None:
        if stats.epoch == 1:
            raise RuntimeError("the machine fell over")

    def stop_after_first(stats) -> None:
        if stats.epoch == 1:
            raise KeyboardInterrupt("SIGTERM")

    other = fast_params(train={"epochs": 2, "lr": 0.2})
    with pytest.raises(RuntimeError, match="fell over"):
        pipeline.train(other, workspace, on_epoch=fail_after_first, fresh=True, show=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(other, workspace, on_epoch=stop_after_first, fresh=True, show=False)
    # nothing of the published run changed, and the stopped run's epoch waits in staging
    assert {p.name: p.read_bytes() for p in workspace.train_dir.iterdir()} == published
    assert checkpoint.load(workspace.checkpoint)["epoch"] == 1
    client = MlflowClient()
    stopped_run = client.get_run(tracking.recorded_run(workspace.staging_dir / "mlflow_run.json"))
    assert stopped_run.info.status == "KILLED"
    assert client.get_run(first.run_id).info.status == "FINISHED"

    resumed = pipeline.train(other, workspace, show=False)
    assert resumed.resumed_from == 1 and resumed.run_id == stopped_run.info.run_id
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert checkpoint.saved_params(workspace.model).train.lr == 0.2


def _runs() -> dict[str, str]:
    """run id -> status of every run in the suite's MLflow store."""
    tracking.use_store()
    found = MlflowClient().search_runs([tracking.experiment_id()], max_results=10_000)
    return {run.info.run_id: run.info.status for run in found}


def test_a_refused_resume_opens_no_mlflow_run(workspace: Artifacts) -> None:
    """A staged checkpoint of other parameters is refused before the run is opened: no FAILED
    run holding the other run's first epoch."""
    v1 = {"model": {"method": "deepcluster"}}
    pipeline.train(fast_params(**v1, train={"epochs": 2}), workspace, stop_after=1, show=False)
    before = _runs()
    with pytest.raises(UserError, match="checkpoint.pt was trained with other parameters"):
        pipeline.train(fast_params(**v1, train={"epochs": 2, "lr": 0.2}), workspace, show=False)
    assert _runs() == before
    assert workspace.checkpoint.exists()  # still there to resume with its own parameters


def test_more_clusters_than_images_is_refused_with_the_k_as_written(workspace: Artifacts) -> None:
    """v2's first head is 5% of k: k-means used to report that head's size as cluster.k."""
    before = _runs()
    with pytest.raises(ParamError, match=r"^cluster.k = 1000000: needs at least k images, got 1797$"):
        pipeline.train(fast_params(cluster={"k": 1_000_000, "heads": [0.05, 1.0]}), workspace)
    heads = r"cluster.heads = \[1.0, 2.0\]: with cluster.k = 1000 the largest head has 2000 clusters"
    with pytest.raises(ParamError, match=heads):
        pipeline.train(fast_params(cluster={"k": 1000}), workspace, show=False)
    assert _runs() == before


def test_a_second_writer_is_refused(workspace: Artifacts) -> None:
    """Another writer (here a thread: the lock is re-entrant only within the thread holding it)."""
    held, release = threading.Event(), threading.Event()

    def other_writer() -> None:
        with lock.writing(workspace, "train"):
            held.set()
            release.wait(60)

    writer = threading.Thread(target=other_writer)
    writer.start()
    try:
        assert held.wait(30)
        busy = pytest.raises(lock.Busy, match=r"being written by `deepcluster train` \(pid \d+")
        with busy:
            pipeline.train(fast_params(train={"epochs": 1}), workspace, show=False)
    finally:
        release.set()
        writer.join()
    assert not workspace.model.exists()


def test_a_diverging_run_stops_at_once_and_keeps_its_last_good_checkpoint(workspace) -> None:
    good = fast_params(model={"method": "deepcluster"}, train={"epochs": 2, "schedule": "constant"})
    pipeline.train(good, workspace, stop_after=1, show=False)
    diverging = fast_params(
        model={"method": "deepcluster"},
        train={"epochs": 2, "schedule": "constant", "lr": 100.0, "momentum": 0.99},
    )
    with pytest.raises(Diverged, match="training diverged in epoch 1: the loss is"):
        pipeline.train(diverging, workspace, fresh=True, show=False)
    assert not workspace.checkpoint.exists() and not workspace.model.exists()


def test_inputs_that_do_not_belong_together_are_refused(workspace: Artifacts) -> None:
    manifest = data.read_manifest(workspace.manifest)
    io.save_parquet(workspace.manifest, manifest.head(100))  # as if a new ingest stopped half-way
    with pytest.raises(UserError, match="was not decoded from .*run `deepcluster ingest` again"):
        pipeline.train(fast_params(train={"epochs": 1}), workspace, show=False)


def test_equal_models_export_to_equal_bytes(tmp_path) -> None:
    """model.pt is a DVC output: re-running an unchanged training must not change its hash."""
    params = fast_params()
    torch.manual_seed(0)
    model = build_model(params.model, [30])
    first = checkpoint.export_model(model, params, tmp_path / "a" / "model.pt")
    second = checkpoint.export_model(model, params, tmp_path / "b" / "model.pt")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.slow
@pytest.mark.numerics
def test_the_head_learns_in_every_epoch_under_cosine(workspace: Artifacts) -> None:
    """v1's head is new every epoch; at the base learning rate it still learns the last epochs'
    labels while the trunk's rate decays to zero (following the trunk, the loss rose at the end)."""
    params = fast_params(model={"method": "deepcluster"}, train={"epochs": 6, "schedule": "cosine"})
    result = pipeline.train(params, workspace, show=False)
    losses = [h.loss for h in result.history]
    assert result.history[-1].lr < 0.01 * params.train.lr  # the trunk has all but stopped
    assert losses[-1] < losses[0], losses
