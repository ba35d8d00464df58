"""Clustering step of DeepCluster: PCA-whiten, L2-normalise, faiss k-means, no empty clusters.
v1 whitens with PCA as the paper does; v2 clusters its unit-norm embeddings with spherical k-means.
The whitening (an identity map for v2) and the centroids are plain arrays (`Clustering`), so a
trained model can assign new images to the learned clusters without faiss.

faiss is optional: on CUDA without faiss-gpu, or with no faiss at all, k-means, assignment and
the PCA run in torch (torch_kmeans.py); faiss stays the CPU default wherever it is installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ParamError
from .io import atomic_path

if TYPE_CHECKING:
    import faiss

    from .config import Params


@dataclass
class Whitening:
    """y = (x @ A.T + b), then L2-normalised. A holds eigenvectors scaled by eigenvalue^-1/2."""

    A: np.ndarray  # (pca_dim, d)
    b: np.ndarray  # (pca_dim,)

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float32) @ self.A.T + self.b
        return l2_normalize(y)


@dataclass
class Clustering:
    assignments: np.ndarray  # (n,) int64 cluster id per image
    distances: np.ndarray  # (n,) squared L2 distance to the assigned centroid
    centroids: np.ndarray  # (k, pca_dim) in the whitened space
    whitening: Whitening
    loss: float  # k-means objective after the last iteration
    reseeded: int  # empty clusters that had to be re-seeded by splitting a large one
    kmeans_largest_share: float  # share of the largest cluster as k-means left it, before re-seeding

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignments, minlength=self.k)

    def size_summary(self) -> dict[str, float]:
        return size_summary(self.assignments, self.k, self.kmeans_largest_share, self.reseeded)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def identity_whitening(dim: int) -> Whitening:
    """No PCA: the embeddings are only L2-normalised (DeepCluster-v2)."""
    return Whitening(A=np.eye(dim, dtype=np.float32), b=np.zeros(dim, dtype=np.float32))


def _faiss():
    """The faiss module, or None where it is not installed (import deepcluster.cluster works)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _torch_device(use_gpu: bool) -> str | None:
    """Where torch does the clustering, or None for faiss: CUDA when a GPU is asked for that
    faiss cannot use, the CPU when there is no faiss at all."""
    if use_gpu and not gpu_available():
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu" if _faiss() is None else None


def _fit_pca(features: np.ndarray, pca_dim: int) -> faiss.PCAMatrix:
    """PCA to `pca_dim` with whitening (eigen power -0.5), as in the paper."""
    faiss = _faiss()
    x = np.ascontiguousarray(features, dtype=np.float32)
    dim = min(pca_dim, x.shape[1], x.shape[0])
    pca = faiss.PCAMatrix(x.shape[1], dim, -0.5)
    pca.epsilon = 1e-6  # a direction with no variance (collapsed features) is not divided by 0
    pca.train(x)
    return pca


def _as_whitening(pca: faiss.PCAMatrix) -> Whitening:
    faiss = _faiss()
    A = faiss.vector_to_array(pca.A).reshape(pca.d_out, pca.d_in)
    b = faiss.vector_to_array(pca.b)
    return Whitening(A=A.astype(np.float32), b=b.astype(np.float32))


def _whiten(
    features: np.ndarray, pca_dim: int | None, use_gpu: bool = False
) -> tuple[Whitening, np.ndarray]:
    """The whitening and the whitened, L2-normalised features. faiss applies the PCA: a numpy
    product here left numpy's BLAS threads spinning on the cores when k-means started, which
    made k-means twice as slow (benchmarks/epoch_throughput.py's kmeans line)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if pca_dim is None:
        return identity_whitening(x.shape[1]), l2_normalize(x)
    device = _torch_device(use_gpu)
    if device is not None:
        return _whiten_torch(x, pca_dim, device)
    pca = _fit_pca(x, pca_dim)
    return _as_whitening(pca), l2_normalize(pca.apply(x))


def _whiten_torch(x: np.ndarray, pca_dim: int, device: str) -> tuple[Whitening, np.ndarray]:
    """`_whiten` without faiss: the same PCA (up to the sign of each axis), applied in torch."""
    import torch

    from . import torch_kmeans

    dim = min(pca_dim, x.shape[1], x.shape[0])
    A, b = torch_kmeans.pca_whitening(x, dim, eps=1e-6, device=device)
    with torch_kmeans.exact_float32():
        xt = torch.as_tensor(x, device=device)
        y = torch.addmm(torch.as_tensor(b, device=device), xt, torch.as_tensor(A, device=device).T)
    return Whitening(A=A, b=b), l2_normalize(y.cpu().numpy())


def _flat_index(dim: int, use_gpu: bool) -> faiss.Index:
    faiss = _faiss()
    if use_gpu and gpu_available():
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = 0
        return faiss.GpuIndexFlatL2(res, dim, cfg)
    return faiss.IndexFlatL2(dim)


def gpu_available() -> bool:
    """faiss-gpu is installed and sees a device (faiss-cpu has no StandardGpuResources)."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def kmeans(
    x: np.ndarray,
    k: int,
    iters: int = 20,
    redo: int = 1,
    seed: int = 0,
    use_gpu: bool = False,
    spherical: bool = False,
) -> tuple[np.ndarray, float]:
    """faiss k-means (spherical: unit centroids); returns centroids (k, d) and the objective.
    torch k-means on CUDA when use_gpu and faiss has no GPU, on the CPU when faiss is missing."""
    n, d = x.shape
    if n < k:
        # not named cluster.k: a v2 head or the evaluation's k = classes clusters too
        raise ParamError(f"k-means into {k} clusters needs at least {k} points, got {n}")
    device = _torch_device(use_gpu)
    if device is not None:
        from . import torch_kmeans

        return torch_kmeans.kmeans(x, k, iters, redo, seed % 2**31, spherical, device)
    faiss = _faiss()
    clus = faiss.Clustering(d, k)
    clus.niter = iters
    clus.nredo = redo
    clus.seed = seed % 2**31  # faiss takes a C int
    clus.spherical = spherical
    clus.max_points_per_centroid = 10_000_000  # use every point: no silent subsampling
    clus.min_points_per_centroid = 1
    index = _flat_index(d, use_gpu)
    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    stats = clus.iteration_stats
    loss = float(stats.at(stats.size() - 1).obj) if stats.size() else float("nan")
    return centroids.astype(np.float32), loss


def assign(
    x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (ids, squared distances)."""
    device = _torch_device(use_gpu)
    if device is not None:
        from . import torch_kmeans

        return torch_kmeans.assign(x, centroids, device)
    index = _flat_index(centroids.shape[1], use_gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), dist[:, 0].astype(np.float32)


def reseed_empty(
    x: np.ndarray, centroids: np.ndarray, ids: np.ndarray, seed: int = 0, eps: float = 1e-4
) -> tuple[np.ndarray, np.ndarray, int]:
    """Give every empty cluster half of a large one, as the reference DeepCluster does.

    The empty centroid becomes a slightly perturbed copy of a centroid drawn with probability
    proportional to its cluster's size; the donor moves the other way, and the donor's members are
    split between the two by distance. Repeats until no cluster is empty (n >= k).
    """
    rng = np.random.default_rng(seed)
    centroids, ids = centroids.copy(), ids.copy()
    k = centroids.shape[0]
    reseeded = 0
    while True:
        sizes = np.bincount(ids, minlength=k)
        empty = np.flatnonzero(sizes == 0)
        if empty.size == 0 or sizes.max() < 2:
            break
        j = int(empty[0])
        donors = np.flatnonzero(sizes >= 2)
        p = sizes[donors] / sizes[donors].sum()
        c = int(rng.choice(donors, p=p))
        noise = eps * rng.standard_normal(centroids.shape[1]).astype(np.float32)
        centroids[j] = centroids[c] + noise
        centroids[c] = centroids[c] - noise
        members = np.flatnonzero(ids == c)
        to_j = _split_members(x[members], centroids[c], centroids[j])
        ids[members[to_j]] = j
        reseeded += 1
    return centroids, ids, reseeded


def _split_members(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of rows closer to b than a; never all or none of them (each side keeps at least one)."""
    closer_b = ((x - b) ** 2).sum(1) < ((x - a) ** 2).sum(1)
    if closer_b.all() or not closer_b.any():
        closer_b = np.zeros(len(x), dtype=bool)
        closer_b[len(x) // 2 :] = True
    return closer_b


def cluster_features(
    features: np.ndarray,
    k: int,
    pca_dim: int | None,
    iters: int = 20,
    redo: int = 1,
    seed: int = 0,
    use_gpu: bool = False,
    spherical: bool = False,
) -> Clustering:
    """Features -> PCA-whiten (unless pca_dim is None) -> L2 -> k-means -> no empty cluster."""
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinity: the network diverged (lower train.lr)")
    whitening, x = _whiten(features, pca_dim, use_gpu)
    centroids, loss = kmeans(x, k, iters, redo, seed, use_gpu, spherical)
    ids, _ = assign(x, centroids, use_gpu)
    raw_largest = float(np.bincount(ids, minlength=k).max() / len(ids))
    centroids, ids, reseeded = reseed_empty(x, centroids, ids, seed)
    if spherical:
        centroids = l2_normalize(centroids)
    dist = ((x - centroids[ids]) ** 2).sum(1).astype(np.float32)
    return Clustering(ids, dist, centroids, whitening, loss, reseeded, raw_largest)


def cluster_as_trained(features: np.ndarray, params: Params, use_gpu: bool = False) -> Clustering:
    """`features` clustered at `cluster.k` the way training clusters them: v1 PCA-whitened to
    `cluster.pca_dim`, v2 its unit embeddings with spherical k-means."""
    c, v2 = params.cluster, params.model.method == "deepcluster-v2"
    pca = None if v2 else int(c.pca_dim)
    return cluster_features(
        features, int(c.k), pca, c.kmeans_iters, c.kmeans_redo, params.train.seed, use_gpu, v2
    )


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information between two labelings (e.g. epochs t-1 and t): scikit-learn's
    `normalized_mutual_info_score` (arithmetic mean of the entropies) in numpy, so the training
    loop needs no scikit-learn. The contingency table is kept sparse: k x k cells at k = 10,000
    would be 800 MB, its non-zero cells are at most n."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"nmi of labelings of different lengths: {a.size} and {b.size}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    ka, kb = int(ia.max(initial=-1)) + 1, int(ib.max(initial=-1)) + 1
    codes, cells = np.unique(ia.astype(np.int64) * kb + ib, return_counts=True)
    if len(codes) == ka == kb:
        return 1.0  # one renames the other (or neither splits the data): exactly 1, as sklearn
    n, cells = float(a.size), cells.astype(np.float64)
    rows, cols = np.bincount(ia, minlength=ka), np.bincount(ib, minlength=kb)
    outer = rows[codes // kb].astype(np.float64) * cols[codes % kb]  # n_i n_j of each cell
    mi = float(max(np.sum(cells / n * (np.log(cells) + np.log(n) - np.log(outer))), 0.0))
    if mi == 0.0:
        return 0.0
    return min(1.0, mi / ((_entropy(rows) + _entropy(cols)) / 2))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def save_clustering(path: Path, clustering: Clustering) -> Path:
    """Whitening, centroids and k-means' own health figures (before re-seeding), atomically."""
    whitening = clustering.whitening
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            centroids=clustering.centroids,
            A=whitening.A,
            b=whitening.b,
            kmeans_largest_share=np.float64(clustering.kmeans_largest_share),
            reseeded=np.int64(clustering.reseeded),
        )
    return path


def load_clustering(path: Path) -> tuple[Whitening, np.ndarray]:
    """The whitening and the centroids: all that is needed to assign new embeddings."""
    with np.load(path) as z:
        return Whitening(A=z["A"], b=z["b"]), z["centroids"]


def size_summary(
    assignments: np.ndarray, k: int, kmeans_largest_share: float, kmeans_empty: int
) -> dict[str, float]:
    """The clusters' sizes in the final assignments, beside k-means' own before the empty clusters
    were re-seeded (re-seeding hides a collapse): the one cluster-size summary of every report."""
    sizes = np.bincount(np.asarray(assignments, dtype=np.int64), minlength=k)
    return {
        "k": k,
        "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster_share": float(sizes.max() / max(sizes.sum(), 1)),
        "smallest_cluster_size": int(sizes[sizes > 0].min()) if sizes.any() else 0,
        "largest_cluster_share_kmeans": float(kmeans_largest_share),
        "empty_clusters_kmeans": int(kmeans_empty),
    }


def saved_size_summary(path: Path, assignments: np.ndarray) -> dict[str, float]:
    """`size_summary` of saved assignments, with k-means' figures from clustering.npz."""
    with np.load(path) as z:
        k, share, empty = int(z["centroids"].shape[0]), z["kmeans_largest_share"], z["reseeded"]
    return size_summary(assignments, k, float(share), int(empty))
