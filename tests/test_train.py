"""Training on the real digits images: resume after a stop, and determinism under one seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcluster import pipeline
from deepcluster.errors import UserError
from deepcluster.models import build_model
from deepcluster.paths import Artifacts
from deepcluster.train import CHECKPOINT, export_model, load_checkpoint

from .conftest import fast_params


def _weights(art: Artifacts) -> dict[str, torch.Tensor]:
    return load_checkpoint(art.train_dir / CHECKPOINT)["model"]


def test_resumed_run_matches_uninterrupted_run(workspace: Artifacts, tmp_path) -> None:
    params = fast_params(train={"epochs": 3})
    whole = pipeline.train_step(params, workspace, progress=False)
    assert [h.epoch for h in whole.history] == [1, 2, 3]

    other = Artifacts(tmp_path / "stopped")
    import shutil

    shutil.copytree(workspace.ingest_dir, other.ingest_dir)
    shutil.copytree(workspace.cache.parent, other.cache.parent)
    stopped = pipeline.train_step(params, other, stop_after=1, progress=False)
    assert len(stopped.history) == 1 and not other.model.exists()  # no final model before the end
    resumed = pipeline.train_step(params, other, progress=False)
    assert resumed.resumed_from == 1
    assert [h.epoch for h in resumed.history] == [1, 2, 3]

    np.testing.assert_array_equal(resumed.assignments, whole.assignments)
    a, b = _weights(workspace), _weights(other)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert [h.loss for h in resumed.history] == pytest.approx([h.loss for h in whole.history])


def test_same_seed_same_assignments_other_seed_differs(workspace: Artifacts, tmp_path) -> None:
    import shutil

    runs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        art = Artifacts(tmp_path / name)
        shutil.copytree(workspace.root, art.root)
        runs.append(
            pipeline.train_step(fast_params(train={"epochs": 1, "seed": seed}), art, progress=False)
        )
    np.testing.assert_array_equal(runs[0].assignments, runs[1].assignments)
    assert not np.array_equal(runs[0].assignments, runs[2].assignments)


def test_checkpoint_from_other_params_is_not_resumed(workspace: Artifacts) -> None:
    pipeline.train_step(fast_params(train={"epochs": 1}), workspace, progress=False)
    with pytest.raises(UserError, match="trained with other parameters"):
        pipeline.train_step(fast_params(train={"epochs": 2, "lr": 0.2}), workspace, progress=False)


def test_constant_schedule_extends_a_finished_run_cosine_does_not(workspace: Artifacts) -> None:
    constant = {"schedule": "constant"}
    pipeline.train_step(fast_params(train={"epochs": 1, **constant}), workspace, progress=False)
    longer = pipeline.train_step(
        fast_params(train={"epochs": 2, **constant}), workspace, progress=False
    )
    assert longer.resumed_from == 1 and len(longer.history) == 2
    with pytest.raises(UserError, match="already holds 2 epochs, more than train.epochs = 1"):
        pipeline.train_step(fast_params(train={"epochs": 1, **constant}), workspace, progress=False)
    # the cosine schedule depends on the run's length: another length is another run
    with pytest.raises(UserError, match="trained with other parameters"):
        pipeline.train_step(fast_params(train={"epochs": 3}), workspace, progress=False)


def test_equal_models_export_to_equal_bytes(tmp_path) -> None:
    """model.pt is a DVC output: re-running an unchanged training must not change its hash."""
    params = fast_params()
    torch.manual_seed(0)
    model = build_model(params.model, params.cluster.k)
    first = export_model(model, params, tmp_path / "a" / "model.pt")
    second = export_model(model, params, tmp_path / "b" / "model.pt")
    assert first.read_bytes() == second.read_bytes()
