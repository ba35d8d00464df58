"""What the assets and checks read back from the artifacts folder because no step returns it: every
use of the library below `deepcluster.pipeline`, each named with the step that could return it."""

from pathlib import Path

import numpy as np
import polars as pl

from deepcluster import lineage, tracking
from deepcluster.checkpoint import saved_params
from deepcluster.cluster import kmeans_health, load_clustering
from deepcluster.evaluate import cluster_size_stats
from deepcluster.paths import Artifacts


def ingest_figures(art: Artifacts, labelled: bool, shown: int) -> dict:
    """The manifest's columns and classes, the first rejected files, the cache's shape and size
    (pipeline.ingest: IngestSummary has the counts only)."""
    cache = np.load(art.cache, mmap_mode="r")
    labels = pl.read_parquet(art.manifest, columns=["label"])["label"] if labelled else None
    return {"columns": pl.read_parquet_schema(art.manifest),
            "classes": 0 if labels is None else labels.n_unique(),
            "rejected": pl.read_parquet(art.rejected, n_rows=shown),
            "cache_shape": tuple(cache.shape), "cache_megabytes": round(cache.nbytes / 2**20, 2)}


def kmeans_figures(art: Artifacts) -> dict:
    """k, and k-means' own figures before empty clusters were re-seeded (pipeline.cluster)."""
    return kmeans_health(art.clustering)


def cluster_figures(art: Artifacts, clusters: np.ndarray) -> dict:
    """The final cluster sizes beside k-means' own figures (pipeline.cluster)."""
    kmeans = kmeans_figures(art)
    return {**cluster_size_stats(clusters, kmeans["k"]), **kmeans}


def mlflow_run(art: Artifacts) -> str:
    """The model's MLflow run (pipeline.evaluate_step, pipeline.curate)."""
    return tracking.run_for(art)


def code_state(root: Path) -> dict:
    """The commit a training ran (pipeline.train: its MLflow run has it, its summary not)."""
    return {"git_commit": lineage.git_commit(root) or "not a git checkout",
            "git_dirty": bool(lineage.git_dirty(root))}  # fmt: skip


def manifest_rows(art: Artifacts) -> int:
    return pl.scan_parquet(art.manifest).select(pl.len()).collect().item()


def embed_dim(art: Artifacts) -> int:
    """The embedding width the model was trained with (checks: pipeline.features)."""
    return saved_params(art.model).model.embed_dim


def whitened_features(art: Artifacts) -> np.ndarray:
    """features.npy as k-means saw it, PCA-whitened and L2-normalised (checks: pipeline.cluster)."""
    whitening, _ = load_clustering(art.clustering)
    return whitening.apply(np.load(art.features))


def model_params(art: Artifacts):
    """The parameters the model was trained with, or None before training (pipeline.train)."""
    return saved_params(art.model) if art.model.exists() else None
