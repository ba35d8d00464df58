"""The network learns: trained features beat the same network at random initialisation.

Both figures are measured in this test on the real digits images, with the default training
settings except for fewer epochs; labels are used only to score, never to train.
"""

from __future__ import annotations

import numpy as np

from deepcluster import pipeline
from deepcluster.config import load_params
from deepcluster.paths import Artifacts

from .conftest import ROOT

EPOCHS = 8


def test_training_beats_random_init_and_stabilises(workspace: Artifacts) -> None:
    defaults = load_params(ROOT / "params.yaml")
    overrides = {"train.epochs": EPOCHS, "data.resolution": 16, "eval.probe_epochs": 200}
    params = load_params(ROOT / "params.yaml", overrides)
    assert params.cluster == defaults.cluster and params.model == defaults.model

    result = pipeline.train_step(params, workspace, progress=False)
    pipeline.features_step(params, workspace, progress=False)
    pipeline.cluster_step(params, workspace)
    m = pipeline.evaluate_step(params, workspace, progress=False)

    # clusters agree better with the digit classes than those of the untrained network
    assert m["nmi"] > m["nmi_random_init"] + 0.03, m
    assert m["nmi_k"] > m["nmi_k_random_init"] + 0.02, m
    # and a linear classifier on the frozen features does better on held-out images
    assert m["linear_top1"] > m["linear_top1_random_init"] + 0.01, m

    # the clustering settles: NMI between consecutive epochs' assignments rises
    stability = [h.nmi_prev for h in result.history[1:]]
    assert np.mean(stability[-3:]) > stability[0] + 0.05, stability
