"""Cluster health: is DeepCluster collapsing, and what the training loop does about it.

Collapse is DeepCluster's known failure: the network maps most images to a few points, k-means
puts them in one cluster, and the pseudo-labels teach the network nothing. k-means' raw output
shows it before the empty clusters are re-seeded (re-seeding would hide it by splitting the big
cluster). The same limits decide the asset check and whether a model may be registered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .cluster import Clustering, nmi

MAX_LARGEST_SHARE = 0.5  # one cluster holding more than half of the images is a collapse
MAX_EMPTY_SHARE = 0.5  # k-means leaving more than half of the clusters empty is one too
LR_FACTOR = 0.5  # how the guard lowers the learning rate after a collapse


@dataclass(frozen=True)
class ClusterHealth:
    largest_share: float  # share of the images in k-means' largest cluster, before re-seeding
    empty: int  # clusters k-means left empty
    k: int
    nmi_prev: float | None  # agreement with the previous epoch's clustering

    @classmethod
    def of(cls, clustering: Clustering, previous: np.ndarray | None) -> ClusterHealth:
        return cls(
            largest_share=clustering.kmeans_largest_share,
            empty=clustering.reseeded,
            k=clustering.k,
            nmi_prev=None if previous is None else nmi(previous, clustering.assignments),
        )

    @property
    def problems(self) -> list[str]:
        found = []
        if self.largest_share > MAX_LARGEST_SHARE:
            found.append(
                f"largest cluster holds {self.largest_share:.0%} of the images "
                f"(limit {MAX_LARGEST_SHARE:.0%})"
            )
        if self.empty > MAX_EMPTY_SHARE * self.k:
            found.append(f"k-means left {self.empty} of {self.k} clusters empty")
        return found

    @property
    def collapsed(self) -> bool:
        return bool(self.problems)


def collapse_problems(metrics: dict) -> list[str]:
    """What makes an evaluated model collapsed, from the figures `evaluate` writes."""
    health = ClusterHealth(
        largest_share=float(metrics.get("largest_cluster_share_kmeans", 0.0)),
        empty=int(metrics.get("empty_clusters_kmeans", 0)),
        k=int(metrics.get("k", 1)),
        nmi_prev=None,
    )
    return health.problems


def react(health: ClusterHealth, state) -> str | None:
    """The guard: on a collapsed clustering, lower the learning rate of every later step (the
    scale lives in the checkpoint) and say so; the loop then clusters again from other seeds."""
    if not health.collapsed:
        return None
    state.lr_scale *= LR_FACTOR
    return (
        f"collapse ({'; '.join(health.problems)}): clustered again from other seeds, "
        f"learning rate now x{state.lr_scale:g}"
    )


GUARD_REASON = re.compile(r"collapse \((?P<reason>.*)\): clustered again")
# what training clustered, per method, against the final clustering (`cluster.cluster_as_trained`)
TRAINING_CLUSTERED = {
    "deepcluster-v2": "the memory bank, the embeddings of each image's augmented crops from the "
    "epoch before (the untrained network's at epoch 1), while the final clustering is spherical "
    "k-means on the final model's embeddings of the plain images",
    "deepcluster": "the PCA-whitened embeddings of the network as it was at that epoch, while the "
    "final clustering is the same k-means on the final model's",
    "deepercluster": "the embeddings of the network as it was at that epoch, in two levels "
    "(super-clusters, then clusters within each), while the final clustering is one PCA-whitened "
    "k-means at k on the final model's",
}


def training_collapse_note(history: list[dict], metrics: dict, method: str) -> str | None:
    """Two sentences when training's clusters collapsed at some epoch (the guard fired, or k-means'
    largest cluster passed MAX_LARGEST_SHARE): when, the largest share, the final clustering's and
    why they differ. None when the history shows no such epoch."""

    def share(entry: dict) -> float:
        return entry.get("largest_cluster_share") or 0.0

    fired = [e for e in history if e.get("guard")]
    over = [e for e in history if share(e) > MAX_LARGEST_SHARE]
    if not fired and not over:
        return None
    said = []
    if fired:
        reasons = [m["reason"] for e in fired if (m := GUARD_REASON.match(e["guard"]))]
        said.append(f"the collapse guard fired at {_epochs(fired)}"
                    + (f" on \u201c{reasons[0]}\u201d" if reasons else ""))  # fmt: skip
    if over:
        said.append(f"one cluster held over {MAX_LARGEST_SHARE:.0%} of the images at {_epochs(over)}")
    peak = max(history, key=share)
    final = metrics.get("largest_cluster_share_kmeans", metrics.get("largest_cluster_share", 0.0))
    return (
        f"During training {' and '.join(said)}; the largest cluster of the clusterings training "
        f"used held up to {share(peak):.1%} of the images (epoch {peak['epoch']}), the final "
        f"clustering's holds {final:.1%}. They differ because training clustered "
        f"{TRAINING_CLUSTERED.get(method, TRAINING_CLUSTERED['deepcluster'])}."
    )


def _epochs(entries: list[dict]) -> str:
    """'epoch 4' or 'epochs 2-4, 9'."""
    runs: list[list[int]] = []
    for n in sorted(e["epoch"] for e in entries):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    spans = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return ("epoch " if len(entries) == 1 else "epochs ") + spans


SHORTCUT_FLOOR = 0.2  # shortcut AMI below this: the clusters barely follow trivial statistics
# what takes colour away, as (key, value, spelled as in params.yaml)
COLOUR_REMEDIES = (("sobel", True, "model.sobel: true"), ("jitter", 0.8, "augment.jitter: 0.8"),
                   ("grayscale", 0.5, "augment.grayscale: 0.5"))  # fmt: skip


def shortcut_problems(metrics: dict, params=None) -> list[str]:
    """A warning when the clusters follow colour, brightness or size at least as much as the
    untrained network's do (`deepcluster.shortcut`), with what `params` has not tried yet."""
    score, base = metrics.get("shortcut"), metrics.get("shortcut_random_init")
    if score is None or base is None or score < max(base, SHORTCUT_FLOOR):
        return []
    found = (
        f"the clusters follow colour, brightness or size (shortcut AMI {score:.2f}) as much as "
        f"the untrained network's do ({base:.2f}): {_remedy(params)}"
    )
    return [found]


def _remedy(params) -> str:
    settings = {} if params is None else {
        "sobel": params.model.sobel, "jitter": params.augment.jitter,
        "grayscale": params.augment.grayscale,
    }  # fmt: skip
    untried = [spelled for key, value, spelled in COLOUR_REMEDIES
               if not isinstance(settings.get(key), (bool, float, int)) or settings[key] < value]
    if untried:
        return "unless colour is what tells your images apart, try " + ", ".join(untried)
    return "unless colour is what tells your images apart, train longer (train.epochs)"
