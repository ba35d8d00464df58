"""The figures of `eval/metrics.json`, in one place: each key's range and which way is better.
Anyone can edit the file or cut it short, so registration checks it against this schema before it
uses a figure. Only higher-is-better figures of the model itself (no baseline) decide `champion`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Figure:
    lo: float
    hi: float = math.inf
    whole: bool = False  # a count: a whole number
    higher_is_better: bool | None = None  # None: describes the clustering, not its quality
    baseline: bool = False  # measured on the untrained network or on raw pixels
    labelled: bool = False  # only written when the folder layout gives labels
    nullable: bool = False  # null when it cannot be measured (one epoch: no NMI(t-1, t))
    optional: bool = False  # written only by some methods or only when there is something to say
    text: bool = False  # a sentence for people, written only when there is something to say

    def rule(self) -> str:
        if self.text:
            return "must be text"
        kind = "a whole number" if self.whole else "a finite number"
        upper = "" if math.isinf(self.hi) else f"..{self.hi:g}"
        return f"must be {kind} in {self.lo:g}{upper}" + (" or null" if self.nullable else "")


SCORE = Figure(0, 1, higher_is_better=True, labelled=True)  # NMI, accuracies: 0..1
ARI = Figure(-1, 1, higher_is_better=True, labelled=True)  # chance is 0, below it is possible
SHARE = Figure(0, 1, higher_is_better=False)  # of the images in one cluster: lower is better
EMPTY = Figure(0, whole=True, higher_is_better=False)  # clusters left empty: lower is better
COUNT = Figure(0, whole=True)

# the class-level probes, each written for the trained model and for two baselines
PROBES = {"nmi": SCORE, "ari": ARI, "accuracy": SCORE, "knn_top1": SCORE, "linear_top1": SCORE,
          "nmi_k": SCORE, "purity_k": SCORE}  # fmt: skip
BASELINES = ("random_init", "pixels")
# label-free, written with or without labels for the model and both baselines: NMI between two
# k-means seeds, share of kNN in the image's own cluster (what promotion compares without labels)
LABEL_FREE = {"seed_stability": Figure(0, 1, higher_is_better=True),
              "knn_agreement": Figure(0, 1, higher_is_better=True)}  # fmt: skip

FIGURES: dict[str, Figure] = {
    "k": Figure(1, whole=True),
    "images": Figure(1, whole=True),
    "empty_clusters": EMPTY,
    "empty_clusters_kmeans": EMPTY,  # before re-seeding: the collapse check reads it
    "largest_cluster_share": SHARE,
    "largest_cluster_share_kmeans": SHARE,
    "smallest_cluster_size": COUNT,
    "nmi_stability": Figure(0, 1, higher_is_better=True, nullable=True),  # NMI(t-1, t)
    **PROBES,
    "nmi_embedding": SCORE,
    "accuracy_embedding": SCORE,
    # DeeperCluster: the super-class head names the quarter turn (chance 0.25); no labels needed
    "rotation_accuracy": Figure(0, 1, higher_is_better=True, optional=True),
    **{f"{key}_{base}": Figure(f.lo, f.hi, higher_is_better=True, baseline=True, labelled=True)
       for key, f in PROBES.items() for base in BASELINES},
    **LABEL_FREE,
    **{f"{key}_{base}": Figure(f.lo, f.hi, higher_is_better=True, baseline=True)
       for key, f in LABEL_FREE.items() for base in BASELINES},
    # how much the clusters follow colour, brightness and size (AMI; below 0 by chance)
    "shortcut": Figure(-1, 1, higher_is_better=False),
    **{f"shortcut_{base}": Figure(-1, 1, higher_is_better=False, baseline=True)
       for base in BASELINES},
    # training's clusters collapsed at some epoch: when, and why the final ones differ (health.py)
    "training_collapse": Figure(0, text=True, optional=True),
}  # fmt: skip
# every figure measured for the model and for both baselines, in the order reports show them
COMPARED = (*PROBES, "shortcut", *LABEL_FREE)


def beside_baselines(metrics: dict) -> list[dict]:
    """Each compared figure of metrics.json with the random-init network's and raw pixels'."""
    return [{"metric": key, "trained": metrics[key], "random_init": metrics.get(f"{key}_random_init"),
             "pixels": metrics.get(f"{key}_pixels")}
            for key in COMPARED if key in metrics]  # fmt: skip


# what `--metric auto` means: the first of these metrics.json has a value for
AUTO_METRICS = ("nmi", "nmi_stability")
PROMOTION_METRICS = tuple(
    key for key, f in FIGURES.items() if f.higher_is_better and not f.baseline
)


def require_promotable(metric: str) -> None:
    """UserError unless `metric` may decide `champion` (higher wins, measured on the model)."""
    if metric in PROMOTION_METRICS:
        return
    figure = FIGURES.get(metric)
    if figure is None:
        why = "not a figure of metrics.json"
    elif figure.baseline:
        why = "a baseline's figure, not the model's"
    elif figure.higher_is_better is False:
        why = "lower is better for it, but the higher value wins champion"
    else:
        why = "it describes the data or the clustering, not how good the model is"
    raise UserError(f"metric {metric!r}: {why}; choose auto or one of: {', '.join(PROMOTION_METRICS)}")


def usable(metric: str | None, value: float | None) -> float | None:
    """`value` when `metric` may decide champion and the value is finite and in its range."""
    if metric not in PROMOTION_METRICS or value is None or not math.isfinite(value):
        return None
    figure = FIGURES[metric]
    return value if figure.lo <= value <= figure.hi else None


def read(path: Path) -> dict[str, Any]:
    """metrics.json, parsed and checked against the schema; UserError (one line) otherwise."""
    if not path.exists():
        raise UserError(f"{path} not found: run `deepcluster evaluate` first")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_finite)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file: run `deepcluster evaluate` again") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}; "
            "cut short?): run `deepcluster evaluate` again"
        ) from None
    except ValueError as err:  # NaN, Infinity
        raise UserError(f"{path}: {err}") from None
    return validate(metrics, path)


def _not_finite(word: str) -> Any:
    raise ValueError(f"{word} is not a finite number: run `deepcluster evaluate` again")


def validate(metrics: Any, source: Path | str) -> dict[str, Any]:
    """`metrics` when every figure has its type and range and the file is complete."""
    if not isinstance(metrics, dict):
        raise UserError(f"{source}: must be a JSON object of figures, got {type(metrics).__name__}")
    unknown = sorted(set(metrics) - set(FIGURES))
    if unknown:
        raise UserError(f"{source}: {unknown[0]!r} is not a figure evaluate writes "
                        "(deepcluster/figures.py lists them)")  # fmt: skip
    missing = [k for k, f in FIGURES.items() if not (f.labelled or f.optional) and k not in metrics]
    if missing:
        raise UserError(f"{source}: {missing[0]} is missing: run `deepcluster evaluate` again")
    for key, value in metrics.items():
        if not _fits(FIGURES[key], value):
            raise UserError(f"{source}: {key} = {value!r}: {FIGURES[key].rule()}")
    for key in ("empty_clusters", "empty_clusters_kmeans"):
        if metrics[key] > metrics["k"]:
            raise UserError(f"{source}: {key} = {metrics[key]}: more than k = {metrics['k']}")
    return metrics


def _fits(figure: Figure, value: Any) -> bool:
    if figure.text:
        return isinstance(value, str)
    if value is None:
        return figure.nullable
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if figure.whole and not isinstance(value, int):
        return False
    return math.isfinite(value) and figure.lo <= value <= figure.hi
