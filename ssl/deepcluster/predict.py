"""Applying a registered model to image files in this process (`deepcluster predict`)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import polars as pl
from mlflow.exceptions import MlflowException

from .errors import UserError
from .io import atomic_path
from .serving import ALLOW_PATHS


def collect_images(paths: list[Path]) -> tuple[list[Path], pl.DataFrame]:
    """Files as given, folders scanned recursively; (images, rejected files with the reason)."""
    from .data import scan_images

    images: list[Path] = []
    rejected: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            manifest, skipped = scan_images(path)
            images += [path / p for p in manifest["path"]]
            rejected += [(str(path / p), r) for p, r in skipped.iter_rows()]
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not images:
        raise UserError(f"no usable images in {', '.join(map(str, paths))}")
    return images, pl.DataFrame(rejected, schema={"path": pl.Utf8, "reason": pl.Utf8}, orient="row")


def predict_files(model_uri: str, paths: list[Path]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(assignments: path, cluster, distance, embedding; rejected) for images under `paths`.

    The model runs in this process on the user's own files, so it may read them (`allow_paths`).
    """
    images, rejected = collect_images(paths)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"cannot load {model_uri}: {err.message}") from err
    frame = pd.DataFrame({"path": [str(p) for p in images]})
    result = model.predict(frame, params={ALLOW_PATHS: True})
    table = pl.DataFrame(
        {
            "path": [str(p) for p in images],
            "cluster": result["cluster"].to_numpy(),
            "distance": result["distance"].to_numpy(),
            "embedding": pl.Series(list(result["embedding"]), dtype=pl.List(pl.Float32)),
        }
    )
    return table, rejected


def write_predictions(table: pl.DataFrame, out: Path) -> Path:
    """Parquet keeps the embeddings; CSV holds path, cluster and distance."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise UserError(f"--out {out}: write to a .parquet or .csv file")
    with atomic_path(out) as tmp:
        if suffix == ".parquet":
            table.write_parquet(tmp)
        else:
            table.drop("embedding").write_csv(tmp)
    return Path(out)
