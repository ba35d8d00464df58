"""The pipeline steps as plain functions: the CLI, the DVC stages, Dagster and the tests call these.

Each step reads the previous step's files under `Artifacts` and writes its own atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import data, evaluate, plots
from .cluster import Clustering, Whitening, cluster_features
from .config import Params
from .device import resolve_device
from .errors import MissingArtifact, UserError
from .io import atomic_path, write_json
from .models import build_model
from .paths import Artifacts
from .train import (
    EpochStats,
    ImageSource,
    TrainResult,
    compute_features,
    eval_batch_size,
    load_model,
    train,
)


def labels_of(manifest: pl.DataFrame) -> np.ndarray | None:
    """Folder labels as an array, or None when the layout gives none."""
    if manifest["label"].null_count() == manifest.height:
        return None
    return manifest["label"].to_numpy().astype(str)


def ingest(data_dir: Path, params: Params, art: Artifacts, progress: bool = True) -> dict:
    """Scan the image folder into manifest + rejected tables and decode the cache once."""
    manifest, rejected = data.scan_images(Path(data_dir), params.data.workers)
    data.require_images(manifest, rejected, Path(data_dir))
    data.write_tables(manifest, rejected, art.ingest_dir)
    data.build_cache(
        Path(data_dir), manifest, params.data.resolution, art.cache, params.data.workers
    )
    return {
        "images": manifest.height,
        "rejected": rejected.height,
        "labelled": labels_of(manifest) is not None,
    }


def require(path: Path, step: str) -> Path:
    """An input made by an earlier step; its absence is a user error naming the step to run."""
    if not Path(path).exists():
        raise MissingArtifact(f"{path} not found: run `deepcluster {step}` first")
    return Path(path)


def _cache(params: Params, art: Artifacts) -> np.ndarray:
    images = data.load_cache(require(art.cache, "ingest"))
    if images.shape[-1] != params.data.resolution:
        raise UserError(
            f"{art.cache} holds {images.shape[-1]} px images but data.resolution = "
            f"{params.data.resolution}: run `deepcluster ingest` again"
        )
    return images


def train_step(
    params: Params,
    art: Artifacts,
    on_epoch: Callable[[EpochStats], None] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    labels = labels_of(data.read_manifest(require(art.manifest, "ingest")))
    return train(params, _cache(params, art), art.train_dir, labels, on_epoch, stop_after, progress)


def _save_npy(path: Path, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
    return path


def features_step(params: Params, art: Artifacts, progress: bool = True) -> np.ndarray:
    """Embeddings of every image under the final model."""
    device = resolve_device(params.train.device)
    model = load_model(require(art.model, "train"), device)
    source = ImageSource(_cache(params, art), device)
    feats = compute_features(model, source, eval_batch_size(params), params.train.amp, progress)
    _save_npy(art.features, feats)
    return feats


def save_clustering(path: Path, clustering: Clustering) -> Path:
    whitening = clustering.whitening
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, centroids=clustering.centroids, A=whitening.A, b=whitening.b)
    return path


def load_clustering(path: Path) -> tuple[Whitening, np.ndarray]:
    """The whitening and the centroids: all that is needed to assign new embeddings."""
    z = np.load(path)
    return Whitening(A=z["A"], b=z["b"]), z["centroids"]


def cluster_step(params: Params, art: Artifacts) -> pl.DataFrame:
    """Cluster the final embeddings; one row per image: path, cluster, distance to centroid."""
    c = params.cluster
    feats = np.load(require(art.features, "features"))
    clustering = cluster_features(
        feats, c.k, c.pca_dim, c.kmeans_iters, c.kmeans_redo, seed=params.train.seed
    )
    manifest = data.read_manifest(art.manifest)
    table = manifest.select("path", "label").with_columns(
        pl.Series("cluster", clustering.assignments, dtype=pl.Int64),
        pl.Series("distance", clustering.distances, dtype=pl.Float32),
    )
    with atomic_path(art.assignments) as tmp:
        table.write_parquet(tmp)
    save_clustering(art.clustering, clustering)
    return table


def random_init_features(params: Params, images: np.ndarray, progress: bool) -> np.ndarray:
    """Embeddings under the network training started from (same seed, no training)."""
    torch.manual_seed(params.train.seed)
    model = build_model(params.model, params.cluster.k)
    device = resolve_device(params.train.device)
    source = ImageSource(images, device)
    batch = eval_batch_size(params)
    return compute_features(model.to(device), source, batch, params.train.amp, progress)


def _labelled_metrics(params, labels, feature_sets: dict[str, np.ndarray], assignments) -> dict:
    """Each metric for each feature set: `name` for the trained one, `name_<set>` for the others."""
    e, seed = params.eval, params.train.seed
    train_idx, test_idx = evaluate.split(len(labels), labels, e.test_fraction, seed)
    out: dict[str, float] = {}
    for name, feats in feature_sets.items():
        suffix = "" if name == "trained" else f"_{name}"
        whiten = name != "pixels"  # the pixel baseline is plain k-means on raw pixels
        scores = evaluate.clustering_scores(
            feats, labels, params.cluster.pca_dim, seed, whiten=whiten
        )
        scores |= evaluate.feature_scores(
            feats, labels, train_idx, test_idx, e.knn_k, e.probe_epochs
        )
        scores["nmi_k"] = evaluate.nmi_at_k(
            feats, labels, params.cluster, seed, whiten, assignments if name == "trained" else None
        )
        out |= {f"{key}{suffix}": value for key, value in scores.items()}
    return out


def evaluate_step(params: Params, art: Artifacts, progress: bool = True) -> dict:
    """metrics.json, history.json and the pictures under artifacts/eval/."""
    images = _cache(params, art)
    table = pl.read_parquet(require(art.assignments, "cluster"))
    assignments = table["cluster"].to_numpy()
    history = _read_history(art)
    metrics: dict = evaluate.cluster_size_stats(assignments, params.cluster.k)
    metrics["images"] = len(assignments)
    metrics["nmi_stability"] = history[-1]["nmi_prev"] if history else None
    labels = labels_of(table)
    if labels is not None:
        feature_sets = {
            "trained": np.load(art.features),
            "random_init": random_init_features(params, images, progress),
            "pixels": evaluate.pixel_features(images),
        }
        metrics |= _labelled_metrics(params, labels, feature_sets, assignments)
    _write_pictures(params, art, images, table, history)
    write_json(art.eval_dir / "history.json", history)
    sizes = np.bincount(assignments, minlength=params.cluster.k)
    write_json(
        art.eval_dir / "cluster_sizes.json",
        [{"cluster": i, "size": int(s)} for i, s in enumerate(sizes)],
    )
    write_json(art.metrics, metrics)
    return metrics


def _read_history(art: Artifacts) -> list[dict]:
    import json

    return json.loads(art.history.read_text()) if art.history.exists() else []


def _write_pictures(params, art, images, table: pl.DataFrame, history: list[dict]) -> None:
    ids = table["cluster"].to_numpy()
    dist = table["distance"].to_numpy()
    e = params.eval
    if history:
        plots.training_curves(history, art.eval_dir / "curves.png")
    plots.cluster_size_histogram(ids, params.cluster.k, art.eval_dir / "cluster_sizes.png")
    plots.clusters_overview(
        images, ids, dist, art.eval_dir / "clusters.png", e.grid_clusters, e.grid_images
    )
    plots.cluster_grids(images, ids, dist, art.eval_dir / "grids", e.grid_images)


def run_all(
    data_dir: Path, params: Params, art: Artifacts, on_epoch=None, progress: bool = True
) -> dict:
    """Every step in order, as `deepcluster run` and `make demo` do."""
    ingest(data_dir, params, art, progress)
    train_step(params, art, on_epoch, progress=progress)
    features_step(params, art, progress)
    cluster_step(params, art)
    return evaluate_step(params, art, progress)


__all__ = [
    "asdict",
    "cluster_step",
    "evaluate_step",
    "features_step",
    "ingest",
    "run_all",
    "train_step",
]
