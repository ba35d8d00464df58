"""Shortcut detector: do the clusters follow trivial image statistics instead of content?
Each image is reduced to colour, brightness and size statistics, k-means groups the images by
them, and the score is the AMI (not NMI, which is high by chance at large k) between those groups
and the clusters under test; the untrained network's score is the yardstick."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score

from .cluster import assign, kmeans

HUE_BINS = 12
GROUPS = 10  # coarse colour/brightness families: a shortcut shows as clusters within one
SAMPLE_SIDE = 16  # statistics of a block-averaged copy: much the same figures, far less work


def _hue_histogram(x: np.ndarray) -> np.ndarray:
    """Per image, the share of saturation in each of HUE_BINS hue sectors (HSV hue, no trig)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    top, low = x.max(axis=1), x.min(axis=1)
    chroma = top - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(top == r, ((g - b) / safe) % 6, (b - r) / safe + 2)
    hue = np.where((top != r) & (top == b), (r - g) / safe + 4, hue)
    sector = np.minimum((hue / 6 * HUE_BINS).astype(int), HUE_BINS - 1)
    n = len(x)
    hist = np.zeros((n, HUE_BINS), dtype=np.float64)
    rows = np.repeat(np.arange(n), sector[0].size)
    np.add.at(hist, (rows, sector.reshape(n, -1).ravel()), chroma.reshape(n, -1).ravel())
    return hist / x[0, 0].size


def image_statistics(
    x: np.ndarray, widths: np.ndarray | None = None, heights: np.ndarray | None = None
) -> np.ndarray:
    """(n, d) trivial statistics of float images (n, 3, h, w) in [0, 1] (a small copy will do:
    `evaluate.downsample`) and of their stored sizes: what a shortcut would cluster on."""
    grey = x.mean(axis=1)
    columns = [
        x.mean(axis=(2, 3)),  # mean colour
        x.std(axis=(2, 3)),  # colour spread
        grey.mean(axis=(1, 2))[:, None],  # brightness
        grey.std(axis=(1, 2))[:, None],  # contrast
        _hue_histogram(x),
    ]
    if widths is not None and heights is not None:
        w, h = np.asarray(widths, float), np.asarray(heights, float)
        columns += [np.log(w * h)[:, None] / 2, np.log(w / h)[:, None]]  # size, aspect
    return np.concatenate(columns, axis=1).astype(np.float32)


def statistics_groups(stats: np.ndarray, seed: int = 0, groups: int = GROUPS) -> np.ndarray:
    """k-means on the standardised statistics (columns with no spread left out)."""
    spread = stats.std(axis=0)
    keep = spread > 1e-6
    if not keep.any():  # every image alike in every statistic: nothing to follow
        return np.zeros(len(stats), dtype=np.int64)
    z = (stats[:, keep] - stats[:, keep].mean(axis=0)) / spread[keep]
    z = np.ascontiguousarray(z, dtype=np.float32)
    centroids, _ = kmeans(z, min(groups, len(z)), iters=20, redo=3, seed=seed)
    return assign(z, centroids)[0]


def scores(groups: np.ndarray, clusterings: dict[str, np.ndarray]) -> dict[str, float]:
    """`shortcut<suffix>` for each named clustering ("trained" has no suffix)."""
    return {
        "shortcut" + ("" if name == "trained" else f"_{name}"): float(
            adjusted_mutual_info_score(groups, ids)
        )
        for name, ids in clusterings.items()
    }
