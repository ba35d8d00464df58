"""What one training epoch reports: the one list of its fields, each with its column title, its
MLflow metric and how the progress line shows it (MLflow, Dagster tables and `describe` read it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _stat(title: str, metric: str | None = None, shown: str | None = None) -> Any:
    """A field's title (tables), MLflow metric (logged with step = epoch) and line format.
    MLflow's charts group metrics by the part before "/" into sections sorted by name: `epoch/`
    comes before the single-value `eval/` figures, so the training curves are seen first."""
    return field(metadata={"title": title, "metric": metric, "shown": shown})


@dataclass
class EpochStats:
    epoch: int = _stat("epoch")  # 1-based
    loss: float = _stat("loss", "epoch/loss", "loss {:.3f}")  # mean pseudo-label cross-entropy
    kmeans_loss: float = _stat("k-means loss", "epoch/kmeans_loss", "kmeans {:.2f}")
    # NMI between this epoch's and the previous epoch's assignments
    nmi_prev: float | None = _stat("NMI(t-1,t)", "epoch/nmi_prev", "NMI(t-1,t) {:.3f}")
    # NMI against the folder labels, when there are any
    nmi_labels: float | None = _stat("NMI(labels)", "epoch/nmi_labels", "NMI(labels) {:.3f}")
    reseeded: int = _stat("re-seeded", "epoch/reseeded_clusters")  # empty clusters split
    lr: float = _stat("lr", "epoch/lr")  # the trunk's learning rate at the end of the epoch
    # as k-means left it, before empty clusters were re-seeded
    largest_cluster_share: float = _stat(
        "largest cluster", "epoch/largest_cluster_share", "largest {:.1%}"
    )
    seconds: float = _stat("seconds", "epoch/seconds", "{:.1f}s")
    guard: str | None = field(  # what the cluster-health guard did, if anything
        default=None, metadata={"title": "guard", "metric": None, "shown": "GUARD: {}"}
    )


def columns() -> dict[str, str]:
    """Field -> column title, in field order."""
    return {f.name: f.metadata["title"] for f in fields(EpochStats)}


def metrics(epoch: dict[str, Any]) -> dict[str, float]:
    """MLflow metric -> value of one epoch (a history row), for the fields that have one."""
    return {
        f.metadata["metric"]: float(epoch[f.name])
        for f in fields(EpochStats)
        if f.metadata["metric"] and epoch.get(f.name) is not None
    }


def describe(stats: EpochStats, epochs: int) -> str:
    """One epoch as a progress line: "epoch 20/100  loss 1.234  ..."."""
    parts = [f"epoch {stats.epoch}/{epochs}"]
    for f in fields(EpochStats):
        value = getattr(stats, f.name)
        if f.metadata["shown"] and value is not None:
            parts.append(f.metadata["shown"].format(value))
    return "  ".join(parts)
