"""Has a batch of new images drifted from what the model learned? Two figures, each with a limit:
the far share (images farther from their k-th nearest training image, in the network's backbone
features, than 99% of training images are from theirs) and the Jensen-Shannon divergence of
cluster sizes from the training's, which counts only above its chance level (`js_chance`)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

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
# Novelty is the distance to the k-th nearest training image in the L2-normalised backbone
# features (deep nearest neighbours, Sun et al. 2022). Not the embedding's distance to its
# centroid: the embedding is what the heads were trained to sort into clusters, so it maps even
# pure noise near some centroid (demo champion: 0% of 60 noise images beyond its 99% distance).
NEIGHBOUR = 5
REFERENCE_IMAGES = 5000  # a seeded sample of the training images, when there are more
FEATURE_BATCH = 256


@dataclass(frozen=True)
class Reference:
    """What the training looked like: the far distance and the cluster shares."""

    far_distance: float  # FAR_QUANTILE of the training images' novelty, each left out
    shares: np.ndarray  # (k,) share of training images per cluster
    fingerprint: str  # of the centroids these figures belong to
    features: np.ndarray | None = None  # (m, d) backbone features novelty is measured against


def reference_from(art: Artifacts) -> Reference:
    from .cluster import load_clustering
    from .paths import require

    table = pl.read_parquet(require(art.assignments, "cluster"), columns=["cluster"])
    _, centroids = load_clustering(require(art.clustering, "cluster"))
    sizes = np.bincount(table["cluster"].to_numpy(), minlength=len(centroids))
    model, cache = require(art.model, "train"), require(art.cache, "ingest")
    features, far = _training_novelty(model, _stamp(model), cache, _stamp(cache))
    return Reference(far, sizes / sizes.sum(), fingerprint(centroids), features)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=2)  # one pass of the network per training, not one per batch
def _training_novelty(model: Path, _model_stamp, cache: Path, _cache_stamp):
    """The training sample's backbone features and the FAR_QUANTILE of their novelty, each
    image left out of the reference it is measured against."""
    images = np.load(cache, mmap_mode="r")
    chosen = np.sort(np.random.default_rng(0).permutation(len(images))[:REFERENCE_IMAGES])
    net = _network(model, _model_stamp)
    # read from the memory map a batch at a time: 5,000 large images need not sit in memory
    features = np.concatenate([backbone_features(net, images[chosen[i : i + FEATURE_BATCH]])
                               for i in range(0, len(chosen), FEATURE_BATCH)])  # fmt: skip
    held_out = kth_distances(features, features, leave_self_out=True)
    return features, float(np.quantile(held_out, FAR_QUANTILE))


@functools.lru_cache(maxsize=2)  # the reference's pass and the batch's use one load
def _network(model_path: Path, _model_stamp):
    from .checkpoint import load_model

    return load_model(model_path, "cpu")


def backbone_features(net, images: np.ndarray) -> np.ndarray:
    """The conv trunk's output for uint8 images, L2-normalised: where novelty is measured."""
    import torch

    from .cluster import l2_normalize
    from .embed import ImageSource, compute_views

    source = ImageSource(np.ascontiguousarray(images), torch.device("cpu"))
    _, trunk = compute_views(net, source, FEATURE_BATCH, amp=False, progress=False)
    return l2_normalize(trunk)


def kth_distances(
    queries: np.ndarray, reference: np.ndarray, k: int = NEIGHBOUR, leave_self_out: bool = False
) -> np.ndarray:
    """Squared distance of each query to its k-th nearest reference row. `leave_self_out`: the
    queries are the reference rows themselves, and each one's own row does not count."""
    k = min(k, len(reference) - leave_self_out)
    if k < 1:
        raise UserError("too few training images to measure novelty against")
    found = []
    for start in range(0, len(queries), 1024):  # bounded memory: 1024 x m distances at a time
        q = queries[start : start + 1024]
        d = (q**2).sum(1)[:, None] - 2 * q @ reference.T + (reference**2).sum(1)[None]
        if leave_self_out:
            d[np.arange(len(q)), np.arange(start, start + len(q))] = np.inf
        found.append(np.partition(d, k - 1, axis=1)[:, k - 1])
    return np.maximum(np.concatenate(found), 0.0) if found else np.zeros(0)


def novelty(art: Artifacts, files: list[Path], ref: Reference) -> np.ndarray:
    """Each file's squared distance to its k-th nearest training image (`Reference.features`),
    decoded at the training resolution as the model decodes it."""
    from .checkpoint import saved_params
    from .imagefile import (
        DECODE_ERRORS,
        ImageLimits,
        ImageRejected,
        decode_bytes,
        read_regular_file,
    )

    resolution, limits = saved_params(art.model).data.resolution, ImageLimits.from_env()
    try:
        images = [decode_bytes(read_regular_file(f, limits), resolution, limits) for f in files]
    except (ImageRejected, *DECODE_ERRORS) as error:
        raise UserError(f"cannot read the batch's images again to measure drift: {error}") from None
    if not images:
        return np.zeros(0, dtype=np.float32)
    net = _network(art.model, _stamp(art.model))
    return kth_distances(backbone_features(net, np.stack(images)), ref.features)


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
        far = (f"beyond the training {FAR_QUANTILE:.0%} distance to the {NEIGHBOUR}th-nearest "
               f"training image ({self.far_distance:.4g})")  # fmt: skip
        chance = f"chance level for {self.images} images: {self.js_chance:.3f}"
        return [
            f"images: {self.images}",
            f"{far}: {self.far_share:.1%} (training-like: about {1 - FAR_QUANTILE:.0%})",
            f"cluster-size JS divergence from training: {self.js_divergence:.3f} bits ({chance})",
        ]

    def as_dict(self) -> dict:
        return asdict(self)


def measure(clusters: np.ndarray, distances: np.ndarray, ref: Reference) -> DriftReport:
    """The drift figures of one batch, given its cluster ids and `novelty` distances."""
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
    table = pl.read_parquet(art.batch_assignments(batch), columns=["path", "cluster"])
    files = [Path(info["folder"]) / p for p in table["path"]]
    return measure(table["cluster"].to_numpy(), novelty(art, files, ref), ref)


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
    """Drift of a prediction table (path, cluster) from the training in `art`; the report
    and its lines, the last one the verdict. With `model_uri`, the model's centroids must be
    those in `art` (else a UserError)."""
    ref = reference_from(art)
    if model_uri is not None:
        from .inbox import load_registered

        require_same_clustering(load_registered(model_uri).fingerprint, ref, model_uri)
    files = [Path(p) for p in table["path"]]
    report = measure(table["cluster"].to_numpy(), novelty(art, files, ref), ref)
    problems = report.problems(max_far_share, max_js)
    verdict = (
        "DRIFTED, a reason to retrain: " + "; ".join(problems)
        if problems
        else "no drift past the limits"
    )
    return report, [*report.lines(), verdict]
