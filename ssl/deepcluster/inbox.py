"""New images arriving in batches, one folder per batch under an inbox folder: each is validated as
training data is and assigned to the learned clusters by a registered model. batch.json names the
model version and its centroids' fingerprint, so drift is measured only against those centroids."""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .errors import UserError
from .io import atomic_path, write_json
from .paths import Artifacts
from .serving import ALLOW_PATHS

DEFAULT_MODEL = "models:/deepcluster@champion"
# also a valid Dagster partition key and a safe folder name under artifacts/inbox/
BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InboxError(UserError):
    """The inbox or a batch folder cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Batches:
    ready: list[str]  # settled folders, valid names
    waiting: list[str]  # empty or changed within the settling time: maybe still being copied
    invalid: list[str]  # names that cannot be partition keys


def list_batches(inbox: Path, settle_seconds: float = 0.0, now: float | None = None) -> Batches:
    """The batch folders in `inbox`, sorted; hidden folders are skipped."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise InboxError(f"inbox folder not found: {inbox}")
    now = time.time() if now is None else now
    ready, waiting, invalid = [], [], []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not BATCH_NAME.fullmatch(folder.name):
            invalid.append(folder.name)
        elif _settled_files(folder, now - settle_seconds):
            ready.append(folder.name)
        else:
            waiting.append(folder.name)
    return Batches(ready, waiting, invalid)


def _settled_files(folder: Path, cutoff: float) -> bool:
    """Holds a file, and nothing in it changed after `cutoff` (a copy in progress would)."""
    latest, files = folder.stat().st_mtime, 0
    for current, _, names in os.walk(folder):
        latest = max(latest, Path(current).stat().st_mtime)
        for name in names:
            files += 1
            latest = max(latest, Path(current, name).lstat().st_mtime)
    return files > 0 and latest <= cutoff


def fingerprint(centroids: np.ndarray) -> str:
    """Short hash of the centroids: tells which clustering a model or an artifacts folder holds."""
    digest = hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class LoadedModel:
    uri: str  # the version actually loaded (models:/name/version when resolvable)
    version: str | None
    model: Any  # mlflow.pyfunc.PyFuncModel
    fingerprint: str


def load_registered(model_uri: str = DEFAULT_MODEL) -> LoadedModel:
    """Load a model, pinning an alias to its version first so the record names what ran."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = _version_of(model_uri)
        uri = model_uri if version is None else f"models:/{_name_of(model_uri)}/{version}"
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise UserError(f"cannot load {model_uri}: {err.message}") from err
    centroids = model.unwrap_python_model().centroids
    return LoadedModel(uri, version, model, fingerprint(centroids))


def _name_of(model_uri: str) -> str:
    return model_uri.removeprefix("models:/").split("@")[0].split("/")[0]


def _version_of(model_uri: str) -> str | None:
    from mlflow.tracking import MlflowClient

    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    parts = rest.split("/")
    return parts[1] if len(parts) == 2 and parts[1].isdigit() else None


@dataclass(frozen=True)
class BatchResult:
    table: pl.DataFrame  # path, sha256, cluster, distance, embedding
    rejected: pl.DataFrame  # path, reason
    info: dict


def assign_batch(folder: Path, art: Artifacts, batch: str, loaded: LoadedModel) -> BatchResult:
    """Validate, embed and assign one batch folder; write its outputs under `out`."""
    import pandas as pd

    from .data import require_images, scan_images

    manifest, rejected = scan_images(Path(folder))
    require_images(manifest, rejected, Path(folder))
    paths = [str(Path(folder) / p) for p in manifest["path"]]
    # our own process reading our own inbox: files may be read (a served request may not)
    predicted = loaded.model.predict(pd.DataFrame({"path": paths}), params={ALLOW_PATHS: True})
    table = manifest.select("path", "sha256").with_columns(
        pl.Series("cluster", predicted["cluster"].to_numpy(), dtype=pl.Int64),
        pl.Series("distance", predicted["distance"].to_numpy(), dtype=pl.Float32),
        pl.Series("embedding", list(predicted["embedding"]), dtype=pl.List(pl.Float32)),
    )
    info = {
        "batch": batch,
        "folder": str(folder),
        "images": table.height,
        "rejected": rejected.height,
        "model_uri": loaded.uri,
        "model_version": loaded.version,
        "centroids_fingerprint": loaded.fingerprint,
    }
    for frame, path in ((table, art.batch_assignments(batch)), (rejected, art.batch_rejected(batch))):
        with atomic_path(path) as tmp:
            frame.write_parquet(tmp)
    write_json(art.batch_info(batch), info)  # last: its presence says the batch is complete
    return BatchResult(table, rejected, info)
