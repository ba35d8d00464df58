"""Duplicates out before curating: exact copies (identical decoded pixels) always, near copies
SemDeDup-style: within a cluster, closest to the centroid first, a member too similar to one
already kept is dropped and that one recorded as its twin. Comparing only with kept members keeps
both ends of a chain of small edits; faiss range search materialises only the close pairs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .cluster import l2_normalize
from .errors import ParamError

# curate.eps (params.yaml, 5e-4): on trained digits embeddings the nearest distinct neighbour in a
# cluster reaches cosine 0.9992 at most, one pixel changed by 16 grey levels stays above 0.9998.


@dataclass(frozen=True)
class Duplicates:
    """Rows dropped and why; all arrays share one order and index the pool."""

    dropped: np.ndarray  # int64 row
    twin: np.ndarray  # int64 row of the kept image it duplicates
    similarity: np.ndarray  # float32 cosine similarity of the pair (1.0 for exact copies)
    kind: np.ndarray  # "exact" | "near"

    def __len__(self) -> int:
        return len(self.dropped)


def find_duplicates(
    embeddings: np.ndarray,
    clusters: np.ndarray,
    distances: np.ndarray,
    eps: float,
    pixels: np.ndarray | None = None,
) -> Duplicates:
    """Exact copies (by pixels, else by embedding bytes), then near copies within clusters."""
    if not 0.0 <= eps < 1.0:
        raise ParamError(f"eps = {eps}: must be in [0, 1) (cosine similarity above 1 - eps)")
    exact = exact_copies(pixels if pixels is not None else embeddings)
    skip = np.zeros(len(clusters), dtype=bool)
    skip[list(exact)] = True
    near = near_copies(embeddings, clusters, distances, eps, skip) if eps > 0 else []
    rows = [(d, t, 1.0, "exact") for d, t in exact.items()] + [(*pair, "near") for pair in near]
    rows.sort()
    return Duplicates(
        dropped=np.array([r[0] for r in rows], dtype=np.int64),
        twin=np.array([r[1] for r in rows], dtype=np.int64),
        similarity=np.array([r[2] for r in rows], dtype=np.float32),
        kind=np.array([r[3] for r in rows], dtype=object),
    )


def exact_copies(rows: np.ndarray) -> dict[int, int]:
    """Row -> the first earlier row with identical bytes."""
    first: dict[bytes, int] = {}
    copies: dict[int, int] = {}
    for i in range(len(rows)):
        key = hashlib.sha256(np.ascontiguousarray(rows[i]).tobytes()).digest()
        if key in first:
            copies[i] = first[key]
        else:
            first[key] = i
    return copies


def near_copies(
    embeddings: np.ndarray,
    clusters: np.ndarray,
    distances: np.ndarray,
    eps: float,
    skip: np.ndarray,
) -> list[tuple[int, int, float]]:
    """(dropped, kept twin, cosine similarity) for each near copy, cluster by cluster."""
    x = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    pairs: list[tuple[int, int, float]] = []
    for cluster in np.unique(clusters):
        members = np.flatnonzero((clusters == cluster) & ~skip)
        members = members[np.argsort(distances[members], kind="stable")]
        pairs += _dedup_cluster(x[members], members, 1.0 - eps)
    return pairs


def _dedup_cluster(x: np.ndarray, rows: np.ndarray, threshold: float) -> list:
    import faiss  # here: importing deepcluster (the training loop) needs no faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, sims, neighbours = index.range_search(x, threshold)  # pairs with similarity > threshold
    kept = np.zeros(len(rows), dtype=bool)
    pairs = []
    for i in range(len(rows)):
        j, s = neighbours[lims[i] : lims[i + 1]], sims[lims[i] : lims[i + 1]]
        earlier = (j < i) & kept[j]
        if earlier.any():
            best = int(np.argmax(np.where(earlier, s, -np.inf)))
            pairs.append((int(rows[i]), int(rows[j[best]]), float(min(s[best], 1.0))))
        else:
            kept[i] = True
    return pairs
