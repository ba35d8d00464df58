"""How good are the clusters and the features? Every figure comes with its baselines.

Metrics against the folder labels (when the layout gives them): NMI, ARI and best-map accuracy of a
clustering, kNN top-1 and a linear probe on frozen features over a held-out split. Each is computed for
the trained network, the same network at random initialisation, and raw pixels, so a reader sees what
training added.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from .cluster import assign, cluster_features, kmeans, l2_normalize, nmi
from .config import ClusterParams


def best_map_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the one-to-one cluster->label map that maximises it (Hungarian algorithm)."""
    label_ids = np.unique(labels, return_inverse=True)[1]
    cluster_ids = np.unique(clusters, return_inverse=True)[1]
    table = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_ids, label_ids), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(labels))


def split(
    n: int, labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices, the same for every feature set compared."""
    idx = np.arange(n)
    counts = np.unique(labels, return_counts=True)[1]
    stratify = labels if counts.min() >= 2 else None
    train, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return np.sort(train), np.sort(test)


def knn_top1(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int
) -> float:
    """Cosine-similarity kNN, votes weighted by similarity."""
    f = l2_normalize(features)
    sims = f[test] @ f[train].T
    k = min(k, len(train))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    classes, train_codes = np.unique(labels[train], return_inverse=True)
    votes = np.zeros((len(test), len(classes)))
    rows = np.repeat(np.arange(len(test)), k)
    np.add.at(votes, (rows, train_codes[top].ravel()), np.take_along_axis(sims, top, 1).ravel())
    return float((classes[votes.argmax(1)] == labels[test]).mean())


def linear_probe(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, max_iter: int
) -> float:
    """Multinomial logistic regression on standardised frozen features."""
    scaler = StandardScaler().fit(features[train])
    clf = LogisticRegression(max_iter=max_iter)
    with warnings.catch_warnings():  # `eval.probe_epochs` is a chosen budget, the same for every
        warnings.simplefilter("ignore", ConvergenceWarning)  # baseline: stopping there is expected
        clf.fit(scaler.transform(features[train]), labels[train])
    return float(clf.score(scaler.transform(features[test]), labels[test]))


def _cluster_ids(
    features: np.ndarray, k: int, pca_dim: int, seed: int, whiten: bool, redo: int
) -> np.ndarray:
    """Network features go through the training transform (PCA-whiten + L2); pixels are clustered raw."""
    if whiten:
        return cluster_features(features, k, pca_dim, iters=30, redo=redo, seed=seed).assignments
    x = np.ascontiguousarray(features, dtype=np.float32)
    centroids, _ = kmeans(x, k, iters=30, redo=redo, seed=seed)
    return assign(x, centroids)[0]


def clustering_scores(
    features: np.ndarray,
    labels: np.ndarray,
    pca_dim: int,
    seed: int,
    whiten: bool = True,
    redo: int = 20,
) -> dict[str, float]:
    """Cluster into as many groups as there are classes (the usual protocol) and score it.

    k-means restarts `redo` times and keeps the lowest objective: with k this small a single run
    lands in a different local optimum per seed, and the score would move with it.
    """
    k = len(np.unique(labels))
    ids = _cluster_ids(features, k, pca_dim, seed, whiten, redo)
    return {
        "nmi": nmi(labels, ids),
        "ari": float(adjusted_rand_score(labels, ids)),
        "accuracy": best_map_accuracy(labels, ids),
    }


def nmi_at_k(
    features: np.ndarray,
    labels: np.ndarray,
    cluster: ClusterParams,
    seed: int,
    whiten: bool = True,
    assignments: np.ndarray | None = None,
) -> float:
    """NMI of the over-clustering at the training k (given `assignments`, or computed here)."""
    if assignments is None:
        assignments = _cluster_ids(
            features, cluster.k, cluster.pca_dim, seed, whiten, cluster.kmeans_redo
        )
    return nmi(labels, assignments)


def feature_scores(
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    knn_k: int,
    probe_iters: int,
) -> dict[str, float]:
    return {
        "knn_top1": knn_top1(features, labels, train, test, knn_k),
        "linear_top1": linear_probe(features, labels, train, test, probe_iters),
    }


def pixel_features(images: np.ndarray, max_side: int = 32) -> np.ndarray:
    """Raw pixels in [0, 1], block-averaged down to at most `max_side` px so large images stay cheap."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    side = x.shape[-1]
    factor = max(1, -(-side // max_side))
    if factor > 1:
        crop = side - side % factor
        x = x[..., :crop, :crop].reshape(
            *x.shape[:2], crop // factor, factor, crop // factor, factor
        )
        x = x.mean(axis=(3, 5))
    return x.reshape(len(x), -1)


def cluster_size_stats(assignments: np.ndarray, k: int) -> dict[str, float]:
    sizes = np.bincount(assignments, minlength=k)
    return {
        "k": k,
        "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster_share": float(sizes.max() / sizes.sum()),
        "smallest_cluster_size": int(sizes[sizes > 0].min()),
    }
