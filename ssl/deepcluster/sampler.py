"""Pseudo-label sampling uniform over clusters, so large clusters cannot dominate an epoch.

Indices are drawn into the full image array and each draw's label is read from the same assignment
array at the same index, so an image always carries its own cluster's label. (The reference code
builds its sampler over one index space and its relabelled dataset over another, which ends up
drawing in proportion to cluster size.)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def uniform_over_clusters(
    assignments: np.ndarray, n_draws: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n_draws` image indices, the same number from every non-empty cluster.

    Returns (indices, labels) with labels[i] == assignments[indices[i]]. Within a cluster images are
    drawn without replacement while the cluster is large enough, with replacement otherwise.
    """
    assignments = np.asarray(assignments)
    clusters = np.unique(assignments)
    if n_draws <= 0 or clusters.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    per_cluster = math.ceil(n_draws / clusters.size)
    picks = [_draw(np.flatnonzero(assignments == c), per_cluster, generator) for c in clusters]
    indices = np.concatenate(picks)
    order = torch.randperm(indices.size, generator=generator).numpy()
    indices = indices[order][:n_draws]
    return indices, assignments[indices].astype(np.int64)


def _draw(members: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    if members.size >= count:
        chosen = torch.randperm(members.size, generator=generator)[:count]
    else:
        chosen = torch.randint(members.size, (count,), generator=generator)
    return members[chosen.numpy()]
