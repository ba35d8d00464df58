"""Where each pipeline step writes: one layout shared by the CLI, the DVC stages and Dagster."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Artifacts:
    root: Path = Path("artifacts")

    @property
    def ingest_dir(self) -> Path:
        return self.root / "ingest"

    @property
    def manifest(self) -> Path:
        return self.ingest_dir / "manifest.parquet"

    @property
    def rejected(self) -> Path:
        return self.ingest_dir / "rejected.parquet"

    @property
    def cache(self) -> Path:
        return self.root / "cache" / "images.npy"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def model(self) -> Path:
        return self.train_dir / "model.pt"

    @property
    def history(self) -> Path:
        return self.train_dir / "history.json"

    @property
    def features(self) -> Path:
        return self.root / "features" / "features.npy"

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def assignments(self) -> Path:
        return self.cluster_dir / "assignments.parquet"

    @property
    def clustering(self) -> Path:
        """Centroids and the PCA-whitening that maps embeddings into their space."""
        return self.cluster_dir / "clustering.npz"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.json"
