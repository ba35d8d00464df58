"""k-means, nearest-centroid assignment and PCA-whitening in torch, on any device.

The twin of cluster.py's faiss path for a machine whose faiss has no GPU support (or no faiss at
all): Lloyd iterations with matmul distances ||x||^2 - 2 x.c + ||c||^2 computed a chunk of rows at
a time, so memory stays O(chunk * k + n + k * d) and no n x k matrix is ever built.

Seeding is faiss's own, not k-means++: k points of faiss's permutation for the same seed, so a run
follows faiss's trajectory (same objective to ~1e-6 until an empty cluster is split), where
k-means++ would cost k sequential passes over the data (k = 10,000).
The distance matmul runs in float32 with TF32/bf16 off: the expansion cancels catastrophically for
a point close to a centroid (unit vectors: terms ~1, distances ~0.1), and TF32's 10-bit mantissa
(~1e-3 relative) would mis-rank near ties and give negative distances.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

# a chunk x k block of distances: 16 MiB of float32 on the CPU (cache-sized blocks were ~25%
# faster at k = 1,000 than 64 MiB ones), 256 MiB on CUDA (big matmuls keep the GPU busy)
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
SPLIT_EPS = 1.0 / 1024.0  # faiss's relative perturbation of a split centroid


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls as IEEE float32: no TF32 on CUDA, no bf16 on CPU, no autocast."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def _as_tensor(x: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """(n, d) float32, contiguous, on `device`."""
    return (
        torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
        .to(device=device, dtype=torch.float32)
        .contiguous()
    )


def _chunk_rows(k: int, chunk: int | None, device: torch.device) -> int:
    """Rows per distance block: `chunk`, or as many as fit the device's CHUNK_ELEMENTS."""
    if chunk is not None:
        return max(1, chunk)
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(k, 1))


def nearest(
    x: torch.Tensor, c: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, d), c (k, d) -> ids (n,) int64 and squared distances (n,) float32, chunk rows at a time.

    Ties go to the lowest centroid id, as in faiss."""
    rows = _chunk_rows(c.shape[0], chunk, x.device)
    c_sq = (c * c).sum(1)
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    with exact_float32():
        for s in range(0, x.shape[0], rows):
            xb = x[s : s + rows]
            scores = torch.addmm(c_sq, xb, c.T, alpha=-2.0)  # (rows, k): ||c||^2 - 2 x.c
            best, ids[s : s + rows] = scores.min(1)
            dist[s : s + rows] = (best + (xb * xb).sum(1)).clamp_min_(0.0)
    return ids, dist


def _centroid_sums(x: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """(k, d) sum of each cluster's rows; deterministic on both devices (index_add_ on the CPU,
    the sort-based accumulating index_put_ on CUDA, where index_add_ uses float atomics)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    if x.is_cuda:
        return sums.index_put_((ids,), x, accumulate=True)
    return sums.index_add_(0, ids, x)


def _update(
    x: torch.Tensor, ids: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New centroids (k, d) as cluster means (an empty cluster keeps its old row) and sizes (k,)."""
    k = c.shape[0]
    sizes = torch.bincount(ids, minlength=k)
    sums = _centroid_sums(x, ids, k)
    filled = sizes > 0
    new = c.clone()
    new[filled] = sums[filled] / sizes[filled].unsqueeze(1).to(torch.float32)
    return new, sizes


def split_empty(c: torch.Tensor, sizes: torch.Tensor, gen: torch.Generator) -> int:
    """faiss's split: each empty centroid becomes a copy of a donor drawn with probability
    proportional to (size - 1), both perturbed by +-SPLIT_EPS in opposite directions, and the
    donor's count is halved. In place on c (k, d); returns how many were split."""
    counts = sizes.cpu().to(torch.float64)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    sign = torch.ones(c.shape[1], device=c.device)
    sign[1::2] = -1.0
    for j in empty:
        weight = (counts - 1.0).clamp_min(0.0)
        if weight.sum() <= 0:
            break
        donor = int(torch.multinomial(weight, 1, generator=gen))
        c[j] = c[donor] * (1.0 + SPLIT_EPS * sign)
        c[donor] = c[donor] * (1.0 - SPLIT_EPS * sign)
        counts[j] = counts[donor] // 2
        counts[donor] -= counts[j]
    return len(empty)


def _normalise(c: torch.Tensor) -> torch.Tensor:
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)


def lloyd(
    x: torch.Tensor,
    k: int,
    iters: int,
    gen: torch.Generator,
    spherical: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, float]:
    """One k-means run on x (n, d): centroids (k, d) and the objective (sum of squared distances)
    of the last iteration's assignment, measured before that iteration's update, as faiss does."""
    perm = torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)
    c = _normalise(x[perm]) if spherical else x[perm].clone()  # faiss renormalises them too
    obj = float("nan")
    for _ in range(iters):
        ids, dist = nearest(x, c, chunk)
        obj = float(dist.double().sum())
        c, sizes = _update(x, ids, c)
        split_empty(c, sizes, gen)
        if spherical:
            c = _normalise(c)
    return c, obj


def kmeans(
    x: np.ndarray | torch.Tensor,
    k: int,
    iters: int = 20,
    redo: int = 1,
    seed: int = 0,
    spherical: bool = False,
    device: str | torch.device = "cpu",
    chunk: int | None = None,
) -> tuple[np.ndarray, float]:
    """k-means of x (n, d) on `device`: the best of `redo` runs -> centroids (k, d) float32 numpy
    and that run's objective, as `cluster.kmeans` returns them. Spherical: unit centroids."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means into {k} clusters needs at least {k} points, got {n}")
    xt = _as_tensor(x, device)
    best_c, best_obj = None, float("inf")
    for r in range(max(redo, 1)):
        # faiss's seed for run r; torch's CPU randperm is the same Fisher-Yates over the same
        # mt19937 as faiss's rand_perm, so each run starts from faiss's very points
        gen = torch.Generator().manual_seed(int(seed) + 1 + r * 15_486_557)
        c, obj = lloyd(xt, k, iters, gen, spherical, chunk)
        if best_c is None or obj < best_obj:
            best_c, best_obj = c, obj
    return best_c.cpu().numpy().astype(np.float32), best_obj


def assign(
    x: np.ndarray | torch.Tensor,
    centroids: np.ndarray | torch.Tensor,
    device: str | torch.device = "cpu",
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of x (n, d) among centroids (k, d): ids (n,) int64 and squared
    distances (n,) float32, numpy, as `cluster.assign` returns them."""
    ids, dist = nearest(_as_tensor(x, device), _as_tensor(centroids, device), chunk)
    return ids.cpu().numpy(), dist.cpu().numpy()


def pca_whitening(
    x: np.ndarray | torch.Tensor,
    dim: int,
    eps: float = 1e-6,
    device: str | torch.device = "cpu",
    chunk: int = 65_536,
) -> tuple[np.ndarray, np.ndarray]:
    """faiss.PCAMatrix(d, dim, eigen_power=-0.5) with epsilon `eps`, without faiss: x (n, d) ->
    A (dim, d), b (dim,) with y = x @ A.T + b, the top `dim` principal directions scaled by
    (eigenvalue + eps)^-1/2. The eigenvalues are the centred scatter matrix's (not divided by n)
    as faiss's are, so `eps` means the same; accumulated in float64 over row chunks. Equal to
    faiss's up to the sign of each row."""
    xt = _as_tensor(x, device)
    n, d = xt.shape
    mean = _chunked_mean(xt, chunk)
    cov = torch.zeros(d, d, dtype=torch.float64, device=xt.device)
    with exact_float32():
        for s in range(0, n, chunk):
            xc = xt[s : s + chunk].double() - mean
            cov += xc.T @ xc
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = torch.argsort(evals, descending=True)[:dim]
    A = evecs[:, top].T * (evals[top].clamp_min(0.0) + eps).rsqrt().unsqueeze(1)
    b = -(A @ mean)
    return A.float().cpu().numpy(), b.float().cpu().numpy()


def _chunked_mean(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(d,) float64 mean of x (n, d) without a float64 copy of all of x."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        total += x[s : s + chunk].double().sum(0)
    return total / x.shape[0]
