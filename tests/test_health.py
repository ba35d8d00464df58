"""The cluster-health guard: a collapse is seen in k-means' own output, training reacts and says
so, and a collapsed model cannot be registered."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from deepcluster import figures, health, pipeline
from deepcluster.cluster import cluster_features
from deepcluster.errors import UserError
from deepcluster.paths import Artifacts
from deepcluster.train import LoopState

from .conftest import fast_params
from .test_figures import EVALUATED


def test_a_collapsed_clustering_is_seen_before_reseeding_hides_it() -> None:
    rng = np.random.default_rng(0)
    spread = rng.normal(size=(300, 16)).astype(np.float32)
    healthy = health.ClusterHealth.of(cluster_features(spread, 10, 8), None)
    assert not healthy.collapsed and healthy.largest_share < 0.3

    collapsed = np.ones((300, 16), dtype=np.float32)  # every image maps to one point
    clustering = cluster_features(collapsed, 10, None)
    assert np.bincount(clustering.assignments).max() < 300  # re-seeding split the big cluster
    seen = health.ClusterHealth.of(clustering, clustering.assignments)
    assert seen.collapsed and seen.largest_share == 1.0
    assert seen.problems[0].startswith("largest cluster holds 100% of the images")

    state = LoopState()
    message = health.react(seen, state)
    assert state.lr_scale == 0.5 and "learning rate now x0.5" in message
    assert health.react(healthy, state) is None and state.lr_scale == 0.5


@pytest.fixture(scope="module")
def one_image_many_files(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 files with the same pixels (their text chunks differ, so none is a byte duplicate)."""
    pixels = np.asarray(Image.open(next((digits_folder / "3").iterdir())))
    folder = tmp_path_factory.mktemp("collapse")
    for label in ("a", "b"):
        (folder / label).mkdir()
        for i in range(30):
            info = PngImagePlugin.PngInfo()
            info.add_text("copy", f"{label}{i}")
            Image.fromarray(pixels).save(folder / label / f"{i:02d}.png", pnginfo=info)
    return folder


# The guard's symptoms (health.ClusterHealth.problems). Which one a collapse shows depends on the
# numeric path: 60 copies of one image embed to one point under bf16 (one cluster holds 100%),
# but fp32 kernels that block the batch differently give a few points apart (k-means leaves most
# clusters empty). Either is a collapse; the tests accept any symptom the guard defines.
SYMPTOM = (
    rf"largest cluster holds \d+% of the images \(limit {health.MAX_LARGEST_SHARE:.0%}\)"
    r"|k-means left \d+ of \d+ clusters empty"
)
GUARD = re.compile(
    rf"collapse \((?:{SYMPTOM})(?:; (?:{SYMPTOM}))*\): clustered again from other seeds, "
    r"learning rate now x(?P<scale>[\d.]+)"
)


@pytest.mark.numerics
def test_training_reacts_to_collapse_and_the_model_is_not_registered(
    one_image_many_files: Path, tmp_path: Path
) -> None:
    art = Artifacts(tmp_path / "artifacts")
    # v1 clusters the plain images every epoch (v2 its augmented crops, which differ)
    params = fast_params(model={"method": "deepcluster"}, cluster={"k": 10}, eval={"knn_k": 5})
    pipeline.ingest(one_image_many_files, params, art, show=False)
    result = pipeline.train(params, art, show=False)
    guards = [h.guard for h in result.history]
    matched = [GUARD.fullmatch(g or "") for g in guards]
    assert all(matched), guards
    assert [m["scale"] for m in matched] == ["0.5", "0.25"]  # lowered again in the second epoch
    for h in result.history:  # the clustering from other seeds is no healthier: one image
        again = health.ClusterHealth(h.largest_cluster_share, h.reseeded, 10, None)
        assert again.collapsed, h

    pipeline.features(art, params, show=False)
    pipeline.cluster(art, params)
    metrics = pipeline.evaluate_step(art, params, show=False)
    problems = health.collapse_problems(metrics)
    assert problems and all(re.fullmatch(SYMPTOM, p) for p in problems), metrics
    # the report says when training collapsed, beside the final clustering's share
    assert "the collapse guard fired at epochs 1-2 on" in metrics["training_collapse"]
    refused = f"not registering a collapsed model: {re.escape('; '.join(problems))}"
    with pytest.raises(UserError, match=refused):
        pipeline.register(art)
    assert not art.registration.exists()


def _history(shares: list[float], guard_at: int | None = None) -> list[dict]:
    """A training history as train.py writes it; the guard's message as `react` words it."""
    fired = health.react(health.ClusterHealth(0.62, 0, 72, None), LoopState())
    return [{"epoch": i, "largest_cluster_share": s, "guard": fired if i == guard_at else None}
            for i, s in enumerate(shares, start=1)]  # fmt: skip


FINAL = {"largest_cluster_share": 0.043, "largest_cluster_share_kmeans": 0.043}


@pytest.mark.parametrize(
    ("method", "why"),
    [("deepcluster-v2", "memory bank"), ("deepcluster", "PCA-whitened"),
     ("deepercluster", "two levels")],
)  # fmt: skip
def test_the_report_says_when_training_collapsed_and_why_the_final_share_differs(
    method: str, why: str
) -> None:
    note = health.training_collapse_note(_history([0.29, 0.38, 0.45, 0.41, 0.1], 4), FINAL, method)
    assert note.startswith("During training the collapse guard fired at epoch 4 on “largest "
                           "cluster holds 62% of the images")  # fmt: skip
    assert "held up to 45.0% of the images (epoch 3)" in note
    assert "the final clustering's holds 4.3%" in note and why in note
    assert note.count(". ") == 1 and note.endswith(".")  # two sentences
    # metrics.json carries it: the schema takes text there, and only text
    assert figures.validate({**EVALUATED, "training_collapse": note}, "m")["training_collapse"] == note
    with pytest.raises(UserError, match="training_collapse = 0.45: must be text$"):
        figures.validate({**EVALUATED, "training_collapse": 0.45}, "m")

    over = health.training_collapse_note(_history([0.2, 0.7, 0.8, 0.3, 0.6]), FINAL, method)
    assert "one cluster held over 50% of the images at epochs 2-3, 5" in over
    assert "guard" not in over and "up to 80.0% of the images (epoch 3)" in over


def test_a_healthy_training_adds_nothing_to_the_report() -> None:
    # 45% in one cluster is below the guard's limit: no collapse, nothing to explain
    assert health.training_collapse_note(_history([0.29, 0.45, 0.2]), FINAL, "deepcluster-v2") is None
    assert health.training_collapse_note([], FINAL, "deepcluster") is None
