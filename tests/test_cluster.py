"""PCA-whitening, faiss k-means and the re-seeding of empty clusters."""

from __future__ import annotations

import numpy as np
import pytest

from deepcluster.cluster import assign, cluster_features, nmi, reseed_empty


def blobs(n_per: int, centers: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 10, (centers, dim))
    labels = np.repeat(np.arange(centers), n_per)
    return (means[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32), labels


def test_whitening_gives_unit_norm_rows_of_the_right_width() -> None:
    x, _ = blobs(50, 4, 32)
    w = cluster_features(x, k=4, pca_dim=8).whitening
    y = w.apply(x)
    assert y.shape == (200, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)


def test_kmeans_recovers_separated_blobs_and_is_seeded() -> None:
    x, labels = blobs(100, 5, 16)
    a = cluster_features(x, k=5, pca_dim=8, iters=20, redo=3, seed=1)
    b = cluster_features(x, k=5, pca_dim=8, iters=20, redo=3, seed=1)
    assert nmi(labels, a.assignments) > 0.95
    np.testing.assert_array_equal(a.assignments, b.assignments)
    assert a.sizes().min() > 0 and a.k == 5
    # distances are to the assigned centroid in the whitened space
    ids, dist = assign(a.whitening.apply(x), a.centroids)
    np.testing.assert_array_equal(ids, a.assignments)
    np.testing.assert_allclose(dist, a.distances, rtol=1e-4, atol=1e-5)


def test_empty_clusters_are_reseeded_by_splitting() -> None:
    x, _ = blobs(40, 2, 4)
    # four centroids, two of them far from every point: they start empty
    centroids = np.vstack([x[:40].mean(0), x[40:].mean(0), np.full(4, 1e3), np.full(4, -1e3)])
    ids, _ = assign(x, centroids.astype(np.float32))
    assert (np.bincount(ids, minlength=4) == 0).sum() == 2
    new_centroids, new_ids, reseeded = reseed_empty(x, centroids.astype(np.float32), ids, seed=0)
    sizes = np.bincount(new_ids, minlength=4)
    assert reseeded == 2 and sizes.min() > 0 and sizes.sum() == 80
    assert np.abs(new_centroids).max() < 1e3  # the far centroids were moved onto the data


def test_non_finite_features_and_too_few_points_are_errors() -> None:
    x, _ = blobs(5, 2, 4)
    with pytest.raises(ValueError, match="k-means into 20 clusters needs at least 20 points"):
        cluster_features(x, k=20, pca_dim=2)
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        cluster_features(x, k=2, pca_dim=2)


def test_nmi_is_scikit_learns_arithmetic_nmi() -> None:
    """The numpy NMI (the training loop imports no scikit-learn) against scikit-learn's own, on
    random, related and degenerate labelings, labels of any dtype among them."""
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    cases = [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [0, 0, 0]), ([], []), (["a", "b", "a"], [5, 7, 5])]
    for _ in range(200):
        n, ka, kb = int(rng.integers(1, 400)), int(rng.integers(1, 15)), int(rng.integers(1, 15))
        a = rng.integers(0, ka, n)
        b = (a + rng.integers(0, 2, n)) % kb if rng.random() < 0.5 else rng.integers(0, kb, n)
        cases.append((a, b - 3))
    for a, b in cases:
        assert abs(nmi(np.array(a), np.array(b)) - normalized_mutual_info_score(a, b)) < 1e-9
    for _ in range(50):  # a labeling against itself, renamed: exactly 1 (loops test == 1.0)
        a = rng.integers(0, int(rng.integers(2, 300)), int(rng.integers(2, 3000)))
        assert nmi(a, a) == 1.0 and nmi(a, rng.permutation(a.max() + 1)[a]) == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        nmi(np.zeros(3), np.zeros(4))
