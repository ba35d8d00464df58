"""The trained model as an MLflow pyfunc model in the registry, and the rule that promotes it.

A registered version bundles the trunk weights (`train/model.pt`), the PCA-whitening and centroids
(`cluster/clustering.npz`), the training resolution and this library's own source, so
`mlflow.pyfunc.load_model("models:/deepcluster@champion")` works in any environment with the
requirements, with or without `deepcluster` installed.

Aliases: every new version becomes `candidate`; `champion` moves to it only when its evaluation
metric is strictly higher than the current champion's (the first version becomes champion).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

from . import tracking
from .errors import UserError
from .io import write_json
from .paths import Artifacts

MODEL_NAME = "deepcluster"
CANDIDATE, CHAMPION = "candidate", "champion"
# higher is better for every figure evaluate writes that makes sense as a promotion metric
DEFAULT_METRICS = ("nmi", "nmi_stability")  # "auto": the first one metrics.json holds
REQUIREMENTS = (
    "mlflow", "torch", "numpy", "pandas", "pillow", "polars", "pyarrow", "faiss-cpu", "faiss-gpu",
    "scikit-learn", "scipy", "pyyaml", "tqdm",
)  # fmt: skip
PREDICT_BATCH = 256
# "models from code": the logged model is this script plus the bundled library, not a pickle
MODEL_CODE = """import mlflow
from deepcluster.registry import DeepClusterModel

mlflow.models.set_model(DeepClusterModel())
"""

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "path", required=False),  # a file the serving process can read
            ColSpec("binary", "image", required=False),  # encoded bytes; base64 in JSON requests
        ]
    ),
    outputs=Schema(
        [
            ColSpec("long", "cluster"),
            ColSpec("float", "distance"),  # squared L2 to the centroid in the whitened space
            ColSpec(Array("float"), "embedding"),  # the network's embedding, as in features.npy
        ]
    ),
)


class DeepClusterModel(mlflow.pyfunc.PythonModel):
    """Images -> embedding -> PCA-whitening + L2 -> nearest learned centroid."""

    def load_context(self, context) -> None:
        from .pipeline import load_clustering
        from .train import load_model

        weights = Path(context.artifacts["model"])
        self.resolution = training_resolution(weights)
        self.net = load_model(weights, "cpu")
        self.whitening, self.centroids = load_clustering(Path(context.artifacts["clustering"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        from .cluster import assign
        from .train import ImageSource, compute_features

        frame = pd.DataFrame(model_input)
        images = np.stack([self._decode(frame, i) for i in range(len(frame))])
        source = ImageSource(images, torch.device("cpu"))
        feats = compute_features(self.net, source, PREDICT_BATCH, amp=False, progress=False)
        ids, dist = assign(self.whitening.apply(feats), self.centroids)
        return pd.DataFrame(
            {
                "cluster": ids.astype(np.int64),
                "distance": dist.astype(np.float32),
                "embedding": [row.tolist() for row in feats],
            }
        )

    def _decode(self, frame: pd.DataFrame, i: int) -> np.ndarray:
        """Row i's image at the training resolution, exactly as ingest decodes files."""
        from .data import decode_image

        path = frame["path"].iloc[i] if "path" in frame else None
        if isinstance(path, str) and path:
            try:
                return decode_image(Path(path), self.resolution)
            except OSError as err:
                raise UserError(f"{path}: cannot read it as an image ({err})") from err
        raw = frame["image"].iloc[i] if "image" in frame else None
        if raw is None or (isinstance(raw, float) and np.isnan(raw)):
            raise UserError(f"row {i}: give a file `path` or encoded `image` bytes")
        if isinstance(raw, str):
            try:
                raw = base64.b64decode(raw, validate=True)
            except binascii.Error as err:
                raise UserError(f"row {i}: `image` is not valid base64 ({err})") from err
        try:
            return decode_image(io.BytesIO(bytes(raw)), self.resolution)
        except OSError as err:
            raise UserError(f"row {i}: `image` is not a decodable image ({err})") from err


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    promoted: bool  # this version now holds `champion`
    metric: str
    value: float
    champion_before: str | None  # version that held `champion` before, if any
    champion_value: float | None  # its value of `metric`
    run_id: str
    model_uri: str  # models:/<name>/<version>

    @property
    def aliases(self) -> list[str]:
        return [CANDIDATE] + ([CHAMPION] if self.promoted else [])

    def summary(self) -> str:
        """One line: the version, its metric, what it was compared with, the verdict."""
        if self.champion_before is None:
            before = "no champion before"
        elif self.champion_value is None:
            before = f"champion version {self.champion_before} has no {self.metric} to compare with"
        else:
            before = f"champion was version {self.champion_before} with {self.champion_value:.4f}"
        verdict = "now champion" if self.promoted else "stays candidate"
        return f"{self.name} version {self.version}: {self.metric} = {self.value:.4f}, {before}; {verdict}"


def register_model(
    art: Artifacts,
    run_id: str | None = None,
    metric: str = "auto",
    name: str = MODEL_NAME,
    tags: dict[str, str] | None = None,
) -> Registration:
    """Log the model in `art` to its run, register it as a new version, then apply the aliases.

    `run_id` defaults to the run recorded by training (`tracking.run_for`). `metric` is a key of
    `eval/metrics.json`, higher is better; "auto" picks NMI against labels when there are labels,
    else the NMI between the last two epochs' clusterings.
    """
    metrics = _read_metrics(art)
    metric = resolve_metric(metric, metrics)
    value = float(metrics[metric])
    run_id = run_id or tracking.run_for(art)
    info = log_pyfunc(art, run_id)
    version_tags = {"promotion_metric": metric, "promotion_value": repr(value), **(tags or {})}
    version = mlflow.register_model(info.model_uri, name, tags=version_tags).version
    client = MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = _alias_version(client, name, CHAMPION)
    best = None if champion is None else _metric_of(client, champion, metric)
    promoted = champion is None or (best is not None and value > best)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted", str(promoted).lower())
    return Registration(
        name=name,
        version=str(version),
        promoted=promoted,
        metric=metric,
        value=value,
        champion_before=None if champion is None else str(champion.version),
        champion_value=best,
        run_id=run_id,
        model_uri=f"models:/{name}/{version}",
    )


def registration_path(art: Artifacts) -> Path:
    """What the `register` step (and DVC stage) writes: name, version, aliases, run id."""
    return art.root / "register" / "registered.json"


def write_registration(reg: Registration, path: Path) -> Path:
    return write_json(path, {**asdict(reg), "aliases": reg.aliases})


def resolve_metric(metric: str, metrics: dict) -> str:
    if metric == "auto":
        metric = next(
            (m for m in DEFAULT_METRICS if metrics.get(m) is not None), DEFAULT_METRICS[-1]
        )
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        usable = sorted(k for k, v in metrics.items() if isinstance(v, float))
        raise UserError(
            f"metric {metric!r} has no value in metrics.json (got {value!r}); "
            f"choose one of: {', '.join(usable)}"
        )
    return metric


def _read_metrics(art: Artifacts) -> dict:
    if not art.metrics.exists():
        raise UserError(f"{art.metrics} not found: run `deepcluster evaluate` first")
    return json.loads(art.metrics.read_text())


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric_of(client: MlflowClient, version, metric: str) -> float | None:
    """The version's value of `metric`: from its run, else from its promotion tags."""
    try:
        value = client.get_run(version.run_id).data.metrics.get(tracking.EVAL_PREFIX + metric)
    except MlflowException:
        value = None
    if value is None and version.tags.get("promotion_metric") == metric:
        value = float(version.tags["promotion_value"])
    return value


# ---------------------------------------------------------------------------------------------
# Logging the pyfunc model


def log_pyfunc(art: Artifacts, run_id: str):
    """Log the model (weights, clustering, resolution, library code) into the run; ModelInfo."""
    for path in (art.model, art.clustering):
        if not path.exists():
            raise UserError(f"{path} not found: run the pipeline up to `deepcluster cluster` first")
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        model_code = Path(tmp, "deepcluster_model.py")
        model_code.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(model_code),
            artifacts={"model": str(art.model), "clustering": str(art.clustering)},
            metadata={"resolution": training_resolution(art.model)},  # shown in MLmodel
            code_paths=[_library_copy(Path(tmp))],
            signature=SIGNATURE,
            input_example=_input_example(art),
            pip_requirements=_requirements(),
        )


def training_resolution(weights: Path) -> int:
    """The square side images were decoded to for training, as recorded in model.pt."""
    from .train import saved_params

    return saved_params(weights).data.resolution


def _library_copy(tmp: Path) -> str:
    """This package's source without bytecode caches, to travel with the model."""
    source = Path(__file__).resolve().parent
    target = tmp / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def _input_example(art: Artifacts) -> pd.DataFrame:
    """One training image, PNG-encoded as a client would send it."""
    from PIL import Image

    from .data import load_cache

    image = np.asarray(load_cache(art.cache)[0]).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def _requirements() -> list[str]:
    """Exact versions of what the bundled code imports (skips MLflow's slow inference)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned


# ---------------------------------------------------------------------------------------------
# Applying a registered model to files (`deepcluster predict`)


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
    """(assignments: path, cluster, distance, embedding; rejected) for images under `paths`."""
    images, rejected = collect_images(paths)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"cannot load {model_uri}: {err.message}") from err
    result = model.predict(pd.DataFrame({"path": [str(p) for p in images]}))
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
    from .io import atomic_path

    suffix = Path(out).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise UserError(f"--out {out}: write to a .parquet or .csv file")
    with atomic_path(out) as tmp:
        if suffix == ".parquet":
            table.write_parquet(tmp)
        else:
            table.drop("embedding").write_csv(tmp)
    return Path(out)
