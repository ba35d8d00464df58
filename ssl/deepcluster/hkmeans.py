"""Hierarchical k-means of DeeperCluster (Caron et al., ICCV 2019): k clusters in two levels.

Level 1 clusters every image into S super-clusters; level 2 clusters the images of each
super-cluster, on their own, into k/S clusters. An image's global cluster is
`super * (k/S) + sub`, so the k global ids are blocks of k/S, one block per super-cluster. Both
levels run on the same PCA-whitened, L2-normalised features (the whitening is fitted once, on
all images, at level 1), as in the reference (src/clustering.py).

Each level is `cluster.cluster_features`: faiss k-means, then every empty cluster re-seeded by
splitting a large one. No n x k matrix is ever formed: k-means and the assignment search the
centroids per point, and level 2 only ever holds one super-cluster's rows.

Choices where the reference leaves a gap or does otherwise:
- k must be a multiple of S (`ParamError` otherwise), as the reference's k // S assumes.
- A super-cluster with fewer images than k/S gets fewer sub-clusters (one per image): k-means
  cannot make more non-empty clusters than points. The unused ids of its block stay empty; their
  centroid slots repeat the block's first centroid, so a nearest-centroid search over all k never
  prefers them (faiss keeps the first of equal distances). `sub_clusters` says how many were made.
- Under several processes rank 0 runs level 1 and broadcasts it; level 2 of super-cluster s runs
  on rank s % world from its own seed, and the results are gathered on every rank. Each
  super-cluster's seed depends on s only, so any number of processes gives the same clustering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import cluster
from . import distributed as dist
from .cluster import Clustering
from .errors import ParamError

SEED_STRIDE = 7919  # level 2 of super-cluster s starts from seed + SEED_STRIDE * s


@dataclass
class HierarchicalClustering(Clustering):
    """A `Clustering` over the k global ids (super * k/S + sub), plus both levels.

    The inherited fields describe the global clustering: `assignments` (n,) global ids,
    `distances` (n,) to the assigned sub-centroid, `centroids` (k, dim) the sub-centroids block by
    block, `whitening` the level-1 PCA, `loss` the k-means objective of the global partition (sum
    of level 2's), `reseeded` level 2's re-seeded clusters, `kmeans_largest_share` the largest
    global cluster's share of all images as k-means left it.
    """

    super_assignments: np.ndarray  # (n,) int64 in [0, S)
    sub_assignments: np.ndarray  # (n,) int64 in [0, k/S): the cluster within its super-cluster
    super_centroids: np.ndarray  # (S, dim)
    super_loss: float  # level 1's k-means objective
    super_reseeded: int  # empty super-clusters re-seeded at level 1
    sub_clusters: np.ndarray  # (S,) sub-clusters made per super-cluster: k/S unless fewer images

    @property
    def super_clusters(self) -> int:
        return int(self.super_centroids.shape[0])

    @property
    def per_super(self) -> int:
        """k/S: the width of each super-cluster's block of global ids."""
        return self.k // self.super_clusters


@dataclass
class _Level2:
    """What one super-cluster's second level sends to the others (rows in member order)."""

    ids: np.ndarray  # (n_s,) sub-cluster per member
    distances: np.ndarray  # (n_s,)
    centroids: np.ndarray  # (k_s, dim), k_s = min(k/S, n_s)
    loss: float
    reseeded: int
    largest: int  # members in the largest sub-cluster as k-means left it


def check_split(k: int, super_clusters: int, images: int) -> int:
    """k/S, or a one-line `ParamError` naming the keys when k and S do not split n images."""
    if super_clusters < 1:
        raise ParamError(f"cluster.super_clusters = {super_clusters}: must be at least 1")
    if k % super_clusters:
        raise ParamError(
            f"cluster.k = {k} must be a multiple of cluster.super_clusters = {super_clusters}"
        )
    if images < super_clusters:
        raise ParamError(
            f"cluster.super_clusters = {super_clusters}: needs at least that many images, "
            f"got {images}"
        )
    return k // super_clusters


def _second_level(
    x: np.ndarray, per_super: int, iters: int, redo: int, seed: int, use_gpu: bool, spherical: bool
) -> _Level2:
    """k-means of one super-cluster's whitened rows `x` (n_s, dim) into min(k/S, n_s) clusters.
    The rows are whitened already: pca_dim None only L2-normalises them again (a no-op)."""
    k_s = min(per_super, len(x))
    c = cluster.cluster_features(x, k_s, None, iters, redo, seed, use_gpu, spherical)
    largest = round(c.kmeans_largest_share * len(x))
    return _Level2(c.assignments, c.distances, c.centroids, c.loss, c.reseeded, largest)


def _my_super_clusters(super_clusters: int, ranks: dist.Ranks) -> range:
    """The super-clusters whose second level this rank runs: s with s % world == rank."""
    return range(ranks.rank, super_clusters, ranks.world)


def _assemble(
    first: Clustering, levels: dict[int, _Level2], x: np.ndarray, per_super: int
) -> HierarchicalClustering:
    """Both levels as one clustering over the k global ids."""
    n, dim = x.shape
    S = first.k
    sub = np.empty(n, dtype=np.int64)
    distances = np.empty(n, dtype=np.float32)
    centroids = np.empty((S * per_super, dim), dtype=np.float32)
    made = np.empty(S, dtype=np.int64)
    for s in range(S):
        level, members = levels[s], np.flatnonzero(first.assignments == s)
        sub[members], distances[members] = level.ids, level.distances
        k_s = len(level.centroids)
        block = centroids[s * per_super : (s + 1) * per_super]
        block[:k_s] = level.centroids
        block[k_s:] = level.centroids[0]  # empty slots: never nearer than the real first centroid
        made[s] = k_s
    return HierarchicalClustering(
        assignments=first.assignments * per_super + sub,
        distances=distances,
        centroids=centroids,
        whitening=first.whitening,
        loss=float(sum(levels[s].loss for s in range(S))),
        reseeded=int(sum(levels[s].reseeded for s in range(S))),
        kmeans_largest_share=max(levels[s].largest for s in range(S)) / n,
        super_assignments=first.assignments.astype(np.int64),
        sub_assignments=sub,
        super_centroids=first.centroids,
        super_loss=first.loss,
        super_reseeded=first.reseeded,
        sub_clusters=made,
    )


def hierarchical_kmeans(
    features: np.ndarray,
    k: int,
    super_clusters: int,
    pca_dim: int | None,
    iters: int = 20,
    redo: int = 1,
    seed: int = 0,
    use_gpu: bool = False,
    spherical: bool = False,
    ranks: dist.Ranks = dist.ONE,
) -> HierarchicalClustering:
    """Cluster `features` (n, d), the same full array on every rank, into `k` clusters through
    `super_clusters` (S) super-clusters; every rank returns the same result.

    `pca_dim` None: no PCA, only L2 (v2's unit embeddings); `spherical` at both levels. With S = 1
    the second level is `cluster_features`' k-means from the same seed on the same whitened
    features: DeepCluster's clustering (up to the rounding of the whitening's product).
    """
    per_super = check_split(k, super_clusters, len(features))
    first = None
    if ranks.main:
        first = cluster.cluster_features(
            features, super_clusters, pca_dim, iters, redo, seed, use_gpu, spherical
        )
    first = dist.broadcast(first, ranks)
    # every rank whitens with the same code, so a super-cluster's rows do not depend on the rank
    x = first.whitening.apply(features)
    mine: dict[int, _Level2] = {}
    for s in _my_super_clusters(super_clusters, ranks):
        members = np.flatnonzero(first.assignments == s)
        mine[s] = _second_level(
            x[members], per_super, iters, redo, seed + SEED_STRIDE * s, use_gpu, spherical
        )
    levels: dict[int, _Level2] = {}
    for part in dist.all_gather_objects(mine, ranks):
        levels.update(part)
    return _assemble(first, levels, x, per_super)
