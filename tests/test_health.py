"""The cluster-health guard: a collapse is seen in k-means' own output, training reacts and says
so, and a collapsed model cannot be registered."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from deepcluster import health, pipeline
from deepcluster.cluster import cluster_features
from deepcluster.errors import UserError
from deepcluster.paths import Artifacts
from deepcluster.train import LoopState

from .conftest import fast_params


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
    refused = f"not registering a collapsed model: {re.escape('; '.join(problems))}"
    with pytest.raises(UserError, match=refused):
        pipeline.register(art)
    assert not art.registration.exists()
