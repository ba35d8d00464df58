"""Curated subsets for labelling: duplicates out (`dedup`), then a budget spread over the clusters.
`water_fill` shares a budget equally, each share capped by what its group holds and the rest shared
again, so no large cluster takes it; the `bins` and `hierarchical` samplers (docs/curation.md) use
it. `curate_step`, the step every front end calls, writes under `Artifacts.curate_dir`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .config import CurateParams
from .dedup import Duplicates, find_duplicates
from .errors import UserError
from .io import atomic_path, write_json
from .paths import Artifacts, cluster_png

SHEET_COLUMNS = 8


@dataclass(frozen=True)
class Pool:
    """The images to curate from, one row each in manifest order."""

    paths: np.ndarray  # str
    clusters: np.ndarray  # int64
    distances: np.ndarray  # squared L2 to the assigned centroid, whitened space
    embeddings: np.ndarray  # (n, d) rows of features.npy
    centroids: np.ndarray  # (k, pca_dim)
    pixels: np.ndarray | None = None  # (n, 3, R, R) uint8: exact copies and contact sheets
    labels: np.ndarray | None = None  # folder labels, for coverage figures only


@dataclass
class Curation:
    subset: pl.DataFrame  # path, row, cluster, bin, parent, distance, reason
    duplicates: pl.DataFrame  # path, twin, cluster, similarity, kind
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sharing a budget out


def water_fill(capacity: np.ndarray, budget: int) -> np.ndarray:
    """Equal shares of `budget`, each capped by its group's capacity; what a capped group cannot
    take is shared again. Units left when fewer than the open groups go to evenly spaced groups
    (first and last included), so callers choose who gets them by the order they pass."""
    capacity = np.asarray(capacity, dtype=np.int64)
    quota = np.zeros_like(capacity)
    left = int(min(budget, capacity.sum()))
    while left > 0:
        open_ = np.flatnonzero(quota < capacity)
        share = left // len(open_)
        if share == 0:
            quota[open_[np.linspace(0, len(open_) - 1, left).round().astype(int)]] += 1
            break
        add = np.minimum(share, capacity[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    return quota


def _fill_in_random_order(capacity: np.ndarray, budget: int, rng) -> np.ndarray:
    """water_fill, with the leftover units going to groups chosen at random."""
    order = rng.permutation(len(capacity))
    quota = np.empty(len(capacity), dtype=np.int64)
    quota[order] = water_fill(np.asarray(capacity)[order], budget)
    return quota


def distance_bins(members: np.ndarray, distances: np.ndarray, bins: int) -> list[np.ndarray]:
    """A cluster's members, closest to the centroid first, cut into equal-frequency bins."""
    ordered = members[np.argsort(distances[members], kind="stable")]
    return np.array_split(ordered, min(bins, len(ordered)))


# ---------------------------------------------------------------------------------------------
# The two samplers: (chosen rows, reason per row, parent per row or None)


def sample_bins(clusters, distances, budget: int, bins: int, rng):
    ids, sizes = np.unique(clusters, return_counts=True)
    chosen, reasons = [], []
    for cluster, size, quota in zip(ids, sizes, _fill_in_random_order(sizes, budget, rng)):
        parts = distance_bins(np.flatnonzero(clusters == cluster), distances, bins)
        # natural bin order: with fewer picks than bins, the closest and farthest bins come first
        for b, (part, q) in enumerate(zip(parts, water_fill([len(p) for p in parts], quota))):
            chosen += rng.choice(part, q, replace=False).tolist()
            why = f"cluster {cluster}: {quota} of {size}; distance bin {b + 1} of {len(parts)}"
            reasons += [why] * q
    return np.array(chosen, dtype=np.int64), reasons, None


def parent_groups(centroids: np.ndarray, parents: int, seed: int) -> np.ndarray:
    """The parent group of each cluster: faiss k-means on the centroids themselves."""
    from .cluster import assign, kmeans

    x = np.ascontiguousarray(centroids, dtype=np.float32)
    top, _ = kmeans(x, min(parents, len(x)), iters=25, redo=5, seed=seed)
    return assign(x, top)[0]


def sample_hierarchical(clusters, parent_of: np.ndarray, budget: int, rng):
    ids, sizes = np.unique(clusters, return_counts=True)
    groups = parent_of[ids]
    tops = np.unique(groups)
    top_sizes = np.array([sizes[groups == p].sum() for p in tops])
    chosen, reasons, parents = [], [], []
    for p, p_size, p_quota in zip(tops, top_sizes, _fill_in_random_order(top_sizes, budget, rng)):
        mine, my_sizes = ids[groups == p], sizes[groups == p]
        for c, size, q in zip(mine, my_sizes, _fill_in_random_order(my_sizes, p_quota, rng)):
            chosen += rng.choice(np.flatnonzero(clusters == c), q, replace=False).tolist()
            why = f"parent {p}: {p_quota} of {p_size}; cluster {c}: {q} of {size}, at random"
            reasons += [why] * q
            parents += [int(p)] * q
    return np.array(chosen, dtype=np.int64), reasons, parents


# ---------------------------------------------------------------------------------------------
# Curating a pool


def curate(pool: Pool, s: CurateParams) -> Curation:
    """Drop duplicates, then draw `s.budget` images (fewer when fewer are left)."""
    dups = find_duplicates(pool.embeddings, pool.clusters, pool.distances, s.eps, pool.pixels)
    rows = np.setdiff1d(np.arange(len(pool.clusters)), dups.dropped)
    clusters, distances = pool.clusters[rows], pool.distances[rows]
    rng = np.random.default_rng(s.seed)
    if s.method == "bins":
        picked, reasons, parents = sample_bins(clusters, distances, s.budget, s.bins, rng)
    else:
        k = len(pool.centroids)
        parent_of = parent_groups(pool.centroids, s.parents or round(k**0.5), s.seed)
        picked, reasons, parents = sample_hierarchical(clusters, parent_of, s.budget, rng)
    subset = _subset_table(pool, rows, picked, reasons, parents, s.bins)
    duplicates = _duplicates_table(pool, dups)
    return Curation(subset, duplicates, _summary(pool, s, dups, rows, subset))


def _bin_of(clusters: np.ndarray, distances: np.ndarray, bins: int) -> np.ndarray:
    out = np.zeros(len(clusters), dtype=np.int32)
    for cluster in np.unique(clusters):
        for b, part in enumerate(
            distance_bins(np.flatnonzero(clusters == cluster), distances, bins)
        ):
            out[part] = b
    return out


def _subset_table(pool: Pool, rows, picked, reasons, parents, bins: int) -> pl.DataFrame:
    bin_of = _bin_of(pool.clusters[rows], pool.distances[rows], bins)
    table = pl.DataFrame(
        {
            "path": pool.paths[rows[picked]].astype(str),
            "row": rows[picked],
            "cluster": pool.clusters[rows[picked]].astype(np.int64),
            "bin": bin_of[picked],
            "parent": pl.Series(parents or [None] * len(picked), dtype=pl.Int64),
            "distance": pool.distances[rows[picked]].astype(np.float32),
            "reason": reasons,
        },
        schema_overrides={"row": pl.Int64, "bin": pl.Int32, "parent": pl.Int64, "reason": pl.Utf8},
    )
    return table.sort("cluster", "bin", "distance")


def _duplicates_table(pool: Pool, dups: Duplicates) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "path": pool.paths[dups.dropped].astype(str),
            "twin": pool.paths[dups.twin].astype(str),
            "cluster": pool.clusters[dups.dropped].astype(np.int64),
            "similarity": dups.similarity,
            "kind": dups.kind.astype(str),
        },
        schema={
            "path": pl.Utf8,
            "twin": pl.Utf8,
            "cluster": pl.Int64,
            "similarity": pl.Float32,
            "kind": pl.Utf8,
        },
    )


def class_coverage(chosen: np.ndarray, classes: np.ndarray) -> dict:
    """How well `chosen` labels cover `classes`: count present, entropy, largest/smallest class."""
    names, counts = np.unique(np.asarray(chosen).astype(str), return_counts=True)
    share = counts / counts.sum() if counts.size else counts
    entropy = float(-(share * np.log2(share)).sum()) if counts.size else 0.0
    total = len(np.unique(np.asarray(classes).astype(str)))
    return {
        "classes_present": len(names),
        "classes": total,
        "entropy_bits": entropy,
        "normalised_entropy": float(entropy / np.log2(total)) if total > 1 else 1.0,
        # largest / smallest count among the classes present (absent ones: classes_present)
        "imbalance": float(counts.max() / counts.min()) if counts.size else None,
    }


def _summary(pool: Pool, s: CurateParams, dups: Duplicates, rows, subset: pl.DataFrame) -> dict:
    summary = {
        "method": s.method,
        "budget": s.budget,
        "bins": s.bins,
        "eps": s.eps,
        "seed": s.seed,
        "images": len(pool.clusters),
        "exact_duplicates": int((dups.kind == "exact").sum()),
        "near_duplicates": int((dups.kind == "near").sum()),
        "candidates": len(rows),
        "chosen": subset.height,
        "clusters": len(np.unique(pool.clusters[rows])),
        "clusters_covered": int(subset["cluster"].n_unique()),
    }
    if pool.labels is not None:
        chosen = pool.labels[subset["row"].to_numpy()]
        summary |= {f"label_{k}": v for k, v in class_coverage(chosen, pool.labels).items()}
    return summary


# ---------------------------------------------------------------------------------------------
# The step: artifacts in, subset + duplicates + contact sheets out


def load_pool(art: Artifacts) -> Pool:
    """The pipeline's files: assignments table, features, centroids and the image cache."""
    from .cluster import load_clustering
    from .data import load_cache
    from .paths import require

    table = pl.read_parquet(require(art.assignments, "cluster"))
    features = np.load(require(art.features, "features"), mmap_mode="r")
    _, centroids = load_clustering(require(art.clustering, "cluster"))
    pixels = load_cache(require(art.cache, "ingest"))
    if not (features.shape[0] == table.height == pixels.shape[0]):
        raise UserError(
            f"{art.features} has {features.shape[0]} rows, {art.assignments} {table.height} and "
            f"{art.cache} {pixels.shape[0]}: run `deepcluster features` and `cluster` again"
        )
    labels = table["label"] if "label" in table.columns else None
    return Pool(
        paths=table["path"].to_numpy(),
        clusters=table["cluster"].to_numpy().astype(np.int64),
        distances=table["distance"].to_numpy(),
        embeddings=np.asarray(features),
        centroids=centroids,
        pixels=pixels,
        labels=None if labels is None or labels.null_count() == len(labels) else labels.to_numpy(),
    )


def curate_step(art: Artifacts, settings: CurateParams) -> Curation:
    """Curate the pipeline's images and write subset, duplicates, summary and contact sheets."""
    pool = load_pool(art)
    result = curate(pool, settings)
    for frame, path in ((result.subset, art.curated_subset), (result.duplicates, art.curate_duplicates)):
        with atomic_path(path) as tmp:
            frame.write_parquet(tmp)
    contact_sheets(pool.pixels, result.subset, art.contact_sheets, np.bincount(pool.clusters))
    write_json(art.curate_summary, result.summary)
    return result


def contact_sheets(
    pixels: np.ndarray, subset: pl.DataFrame, out_dir: Path, sizes: np.ndarray
) -> list[Path]:
    """One picture per cluster of the images chosen from it, closest to the centroid first."""
    from .plots import image_grid

    if out_dir.exists():  # a previous curation's sheets would show clusters not chosen now
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    scale = max(1, 48 // pixels.shape[-1])
    written = []
    for (cluster,), group in subset.group_by("cluster", maintain_order=True):
        caption = f"cluster {cluster}: {group.height} of {sizes[cluster]}, typical to unusual"
        grid = image_grid(pixels[group["row"].to_numpy()], SHEET_COLUMNS, scale, caption)
        path = cluster_png(out_dir, cluster)
        with atomic_path(path) as tmp:
            grid.save(tmp, format="PNG")
        written.append(path)
    return written


METRIC_PREFIX = "subset/"


def log_curation(art: Artifacts, result: Curation) -> str:
    """Log the summary as `subset/*` metrics and the outputs as artifacts (`curate/`) of the
    model's run. MLflow orders its chart sections by name: `subset` sorts after the training
    curves (`epoch/`) and the evaluation (`eval/`), so the curves come first."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from . import tracking

    run_id = tracking.run_for(art)
    now = int(time.time() * 1000)
    numbers = {k: v for k, v in result.summary.items() if isinstance(v, (int, float))}
    metrics = [Metric(f"{METRIC_PREFIX}{k}", float(v), now, 0) for k, v in numbers.items()]
    client = MlflowClient()
    client.log_batch(run_id, metrics=metrics)
    client.log_artifacts(run_id, str(art.curate_dir), artifact_path="curate")
    return run_id
