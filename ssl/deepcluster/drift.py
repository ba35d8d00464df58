"""Has a batch of new images drifted from what the model learned? Two figures, each with a limit:
the far share (images beyond the training's 99th-percentile distance to their centroid, training
distances taken as if each image were left out of its centroid) and the Jensen-Shannon divergence
of cluster sizes from the training's, which counts only above its chance level (`js_chance`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from .errors import ParamError, UserError
from .inbox import fingerprint
from .paths import Artifacts

FAR_QUANTILE = 0.99
MAX_FAR_SHARE = 0.10  # ten times what training-like images show
# unseen digits against a 300-image, k=30 training: 0.13 (in-sample k-means); inverted ones: 0.42
MAX_JS = 0.20
CHANCE_DRAWS = 400


@dataclass(frozen=True)
class Reference:
    """What the training looked like: the far distance and the cluster shares."""

    far_distance: float  # FAR_QUANTILE of the training distances to the centroid
    shares: np.ndarray  # (k,) share of training images per cluster
    fingerprint: str  # of the centroids these figures belong to


def reference_from(art: Artifacts) -> Reference:
    from .cluster import load_clustering
    from .paths import require

    table = pl.read_parquet(require(art.assignments, "cluster"))
    _, centroids = load_clustering(require(art.clustering, "cluster"))
    clusters = table["cluster"].to_numpy()
    sizes = np.bincount(clusters, minlength=len(centroids))
    held_out = left_out_distances(table["distance"].to_numpy(), clusters)
    return Reference(
        float(np.quantile(held_out, FAR_QUANTILE)), sizes / sizes.sum(), fingerprint(centroids)
    )


def left_out_distances(distances: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Each squared distance as if its image had not been part of its centroid's mean.

    c' = (n c - x) / (n - 1) gives |x - c'|^2 = (n / (n - 1))^2 |x - c|^2. A single-image cluster
    says nothing about spread and is left out, unless every cluster is a single image.
    """
    n = np.bincount(clusters)[clusters].astype(np.float64)
    several = n > 1
    if not several.any():
        return distances
    return distances[several] * (n[several] / (n[several] - 1)) ** 2


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two distributions over the same categories."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m))


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    mask = p > 0  # m > 0 wherever p > 0
    return float((p[mask] * np.log2(p[mask] / m[mask])).sum())


def chance_js(shares: np.ndarray, n: int, draws: int = CHANCE_DRAWS, seed: int = 0) -> float:
    """95th percentile of the divergence of n images drawn from the training shares."""
    counts = np.random.default_rng(seed).multinomial(n, shares, size=draws)
    return float(np.quantile([js_divergence(c, shares) for c in counts], 0.95))


@dataclass(frozen=True)
class DriftReport:
    images: int
    far_share: float
    far_distance: float
    js_divergence: float
    js_chance: float

    def problems(self, max_far_share: float = MAX_FAR_SHARE, max_js: float = MAX_JS) -> list[str]:
        """Why the batch counts as drifted; empty when it does not."""
        found = []
        if self.far_share > max_far_share:
            found.append(
                f"{self.far_share:.1%} of images lie beyond the training's "
                f"{FAR_QUANTILE:.0%} distance (limit {max_far_share:.1%})"
            )
        limit = max(max_js, self.js_chance)
        if self.js_divergence > limit:
            found.append(
                f"cluster-size divergence {self.js_divergence:.3f} bits above {limit:.3f} "
                f"(limit {max_js:.3f}, chance level for {self.images} images {self.js_chance:.3f})"
            )
        return found

    def lines(self) -> list[str]:
        far = f"beyond the training {FAR_QUANTILE:.0%} distance ({self.far_distance:.4g})"
        chance = f"chance level for {self.images} images: {self.js_chance:.3f}"
        return [
            f"images: {self.images}",
            f"{far}: {self.far_share:.1%} (training-like: about {1 - FAR_QUANTILE:.0%})",
            f"cluster-size JS divergence from training: {self.js_divergence:.3f} bits ({chance})",
        ]

    def as_dict(self) -> dict:
        return asdict(self)


def measure(clusters: np.ndarray, distances: np.ndarray, ref: Reference) -> DriftReport:
    """The drift figures of one batch, given its cluster ids and distances to the centroid."""
    clusters, distances = np.asarray(clusters), np.asarray(distances)
    if len(clusters) == 0:
        raise UserError("no images to measure drift on")
    k = len(ref.shares)
    if clusters.min() < 0 or clusters.max() >= k:
        raise UserError(f"cluster ids outside 0..{k - 1}: the batch was assigned by another model")
    sizes = np.bincount(clusters, minlength=k)
    return DriftReport(
        images=len(clusters),
        far_share=float((distances > ref.far_distance).mean()),
        far_distance=ref.far_distance,
        js_divergence=js_divergence(sizes, ref.shares),
        js_chance=chance_js(ref.shares, len(clusters)),
    )


def require_same_clustering(model_fingerprint: str, ref: Reference, what: str) -> None:
    """Drift figures only mean something against the training that made the model's centroids."""
    if model_fingerprint != ref.fingerprint:
        raise UserError(
            f"{what} was assigned with centroids {model_fingerprint}, but the artifacts hold "
            f"centroids {ref.fingerprint}: measure drift against the artifacts of that model"
        )


def batch_drift(art: Artifacts, batch: str) -> DriftReport:
    """Drift of an inbox batch written by `inbox.assign_batch`, against the training in `art`."""
    import json

    info_path = art.batch_info(batch)
    if not info_path.exists():
        raise UserError(f"{info_path} not found: assign batch {batch!r} first")
    info = json.loads(info_path.read_text())
    ref = reference_from(art)
    require_same_clustering(info["centroids_fingerprint"], ref, f"batch {batch!r}")
    table = pl.read_parquet(art.batch_assignments(batch), columns=["cluster", "distance"])
    return measure(table["cluster"].to_numpy(), table["distance"].to_numpy(), ref)


def check_limits(max_far_share: float, max_js: float) -> None:
    for name, value in (("max_far_share", max_far_share), ("max_js", max_js)):
        if not 0.0 <= value <= 1.0:
            raise ParamError(f"{name} = {value}: must be between 0 and 1")


def predicted_drift(
    table: pl.DataFrame,
    art: Artifacts,
    model_uri: str | None = None,
    max_far_share: float = MAX_FAR_SHARE,
    max_js: float = MAX_JS,
) -> tuple[DriftReport, list[str]]:
    """Drift of a prediction table (cluster, distance) from the training in `art`; the report
    and its lines, the last one the verdict. With `model_uri`, the model's centroids must be
    those in `art` (else a UserError)."""
    ref = reference_from(art)
    if model_uri is not None:
        from .inbox import load_registered

        require_same_clustering(load_registered(model_uri).fingerprint, ref, model_uri)
    report = measure(table["cluster"].to_numpy(), table["distance"].to_numpy(), ref)
    problems = report.problems(max_far_share, max_js)
    verdict = (
        "DRIFTED, a reason to retrain: " + "; ".join(problems)
        if problems
        else "no drift past the limits"
    )
    return report, [*report.lines(), verdict]
