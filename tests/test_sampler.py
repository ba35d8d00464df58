"""The pseudo-label sampler draws uniformly over clusters, and every draw keeps its own label."""

from __future__ import annotations

import numpy as np
import torch

from deepcluster.sampler import uniform_over_clusters
from deepcluster.train import ImageSource


def skewed_assignments() -> np.ndarray:
    # cluster 0 holds 900 of 1000 images; clusters 1..9 hold 11 or 12 each; cluster 10 is empty
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.zeros(900, int), np.repeat(np.arange(1, 10), 12)[:100]])
    return rng.permutation(ids)


def test_draw_counts_are_flat_over_non_empty_clusters() -> None:
    ids = skewed_assignments()
    indices, labels = uniform_over_clusters(ids, 1000, torch.Generator().manual_seed(0))
    counts = np.bincount(labels, minlength=11)
    assert len(indices) == 1000 and counts[10] == 0
    # 10 non-empty clusters, 1000 draws: 100 each up to the truncation of the last shuffled batch
    assert counts[:10].min() >= 90 and counts[:10].max() <= 101
    # proportional-to-size sampling, the reference's failure mode, would give cluster 0 about 900
    assert counts[0] < 2 * counts[1:10].mean()


def test_each_draw_carries_its_own_cluster_label() -> None:
    ids = skewed_assignments()
    indices, labels = uniform_over_clusters(ids, 500, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(labels, ids[indices])
    # and through the training data path: images whose pixels spell their cluster id
    images = np.broadcast_to(ids.astype(np.uint8)[:, None, None, None], (len(ids), 3, 4, 4)).copy()
    batch = ImageSource(images, torch.device("cpu")).batch(indices[:128])
    np.testing.assert_array_equal(batch[:, 0, 0, 0].numpy(), labels[:128])


def test_small_clusters_are_drawn_with_replacement_large_ones_without() -> None:
    ids = np.array([0] * 50 + [1] * 2)
    indices, labels = uniform_over_clusters(ids, 40, torch.Generator().manual_seed(2))
    big = indices[labels == 0]
    assert len(np.unique(big)) == len(big)  # no repeats inside a cluster that is large enough
    assert set(indices[labels == 1]) <= {50, 51}
