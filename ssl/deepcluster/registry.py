"""Registering the trained model in MLflow and deciding which version is `champion`.
A version bundles the trunk weights, the whitening and centroids and this library's source, so it
loads with or without `deepcluster` installed. A collapsed model, or a metrics file its schema
(`figures`) refuses, is not registered; one that does not beat its baselines stays candidate.
Rule: `promotion`; what the loaded model does: `serving`."""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import figures, tracking
from .errors import UserError
from .health import collapse_problems
from .io import write_json
from .paths import Artifacts
from .predict import collect_images, predict_files, write_predictions
from .promotion import (
    CANDIDATE,
    CHAMPION,
    TAG_BASELINES,
    TAG_DATA,
    TAG_DIGEST,
    TAG_METRIC,
    TAG_PROMOTED,
    TAG_REASON,
    TAG_VALUE,
    Record,
    baseline_shortfalls,
    promote,
)
from .serving import PREDICT_BATCH, SIGNATURE, DeepClusterModel, input_example, training_resolution

# names other modules and older bundled models import from here
__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "PREDICT_BATCH",
    "SIGNATURE",
    "DeepClusterModel",
    "Registration",
    "collect_images",
    "log_pyfunc",
    "predict_files",
    "register_model",
    "resolve_metric",
    "training_resolution",
    "write_predictions",
    "write_registration",
]

MODEL_NAME = "deepcluster"
REQUIREMENTS = (
    "mlflow", "torch", "numpy", "pandas", "pillow", "polars", "pyarrow", "faiss-cpu", "faiss-gpu",
    "scikit-learn", "scipy", "pyyaml", "tqdm",
)  # fmt: skip
# "models from code": the logged model is this script plus the bundled library, not a pickle
MODEL_CODE = """import mlflow
from deepcluster.serving import DeepClusterModel

mlflow.models.set_model(DeepClusterModel())
"""

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
    reason: str = ""  # why it was or was not promoted
    data_md5: str | None = None  # the data version of its run

    @property
    def aliases(self) -> list[str]:
        return [CANDIDATE] + ([CHAMPION] if self.promoted else [])

    @classmethod
    def of_version(cls, client: MlflowClient, version) -> Registration:
        """The registration an existing version records in its tags (and aliases now)."""
        tags = version.tags
        champion = _alias(client, version.name, CHAMPION)
        return cls(
            name=version.name,
            version=str(version.version),
            promoted=champion == str(version.version),
            metric=tags.get(TAG_METRIC, ""),
            value=float(tags.get(TAG_VALUE, "nan")),
            champion_before=None,
            champion_value=None,
            run_id=version.run_id,
            model_uri=f"models:/{version.name}/{version.version}",
            reason=f"already registered as version {version.version}; no new version",
            data_md5=tags.get(TAG_DATA),
        )

    def summary(self) -> str:
        """One line: the version, its metric, what it was compared with, the verdict."""
        verdict = "now champion" if self.promoted else "stays candidate"
        value = f"{self.metric} = {self.value:.4f}"
        return f"{self.name} version {self.version}: {value}, {self.reason}; {verdict}"


def register_model(
    art: Artifacts,
    run_id: str | None = None,
    metric: str = "auto",
    name: str = MODEL_NAME,
    tags: dict[str, str] | None = None,
) -> Registration:
    """Log the model in `art` to its run, register it as a new version, then apply the aliases.

    `run_id` defaults to the run recorded by training (`tracking.run_for`). `metric` is one of
    `figures.PROMOTION_METRICS` (higher is better); "auto" picks NMI against labels when there
    are labels, else the NMI between the last two epochs' clusterings. metrics.json is checked
    against its schema (`deepcluster.figures`) before any of it is used. A model that is not
    above the random-init network and raw pixels (`promotion.baseline_shortfalls`) stays
    candidate, the figures it fell short on in its `promotion_reason` tag.
    """
    if metric != "auto":
        figures.require_promotable(metric)
    metrics = figures.read(art.metrics)
    refuse_collapsed(metrics, art.metrics)
    metric = resolve_metric(metric, metrics)
    value = float(metrics[metric])
    shortfalls = baseline_shortfalls(metrics)
    digest = model_digest(art)
    client = MlflowClient()
    existing = _version_with_digest(client, name, digest)
    if existing is not None:  # this very model (weights, clustering, figures) is registered
        return Registration.of_version(client, existing)
    run_id = run_id or tracking.run_for(art)
    data_md5 = _run_tag(client, run_id, TAG_DATA)
    info = log_pyfunc(art, run_id)
    # the version's own record, written with it in one call: what promotion compares
    own = {TAG_METRIC: metric, TAG_VALUE: repr(value), TAG_DIGEST: digest,
           TAG_BASELINES: str(not shortfalls).lower()}  # fmt: skip
    own |= {TAG_DATA: data_md5} if data_md5 else {}
    version = str(mlflow.register_model(info.model_uri, name, tags={**(tags or {}), **own}).version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    verdict = promote(client, name, Record(version, metric, value, data_md5, shortfalls))
    client.set_model_version_tag(name, version, TAG_PROMOTED, str(verdict.promote).lower())
    client.set_model_version_tag(name, version, TAG_REASON, verdict.reason)
    champion = verdict.champion
    return Registration(
        name=name,
        version=version,
        promoted=verdict.promote,
        metric=metric,
        value=value,
        champion_before=champion.version if champion else None,
        champion_value=champion.value if champion else None,
        run_id=run_id,
        model_uri=f"models:/{name}/{version}",
        reason=verdict.reason,
        data_md5=data_md5,
    )


def refuse_collapsed(metrics: dict, source: Path) -> None:
    """UserError naming the figures when the clustering collapsed; missing figures pass."""
    problems = collapse_problems(metrics)
    if problems:
        raise UserError(f"not registering a collapsed model: {'; '.join(problems)} (in {source})")


def _run_tag(client: MlflowClient, run_id: str, key: str) -> str | None:
    try:
        return client.get_run(run_id).data.tags.get(key)
    except MlflowException:
        return None


def write_registration(reg: Registration, path: Path) -> Path:
    return write_json(path, {**asdict(reg), "aliases": reg.aliases})


def model_digest(art: Artifacts) -> str:
    """sha256 over what a registered version holds: weights, clustering, evaluation figures."""
    digest = hashlib.sha256()
    for path in (art.model, art.clustering, art.metrics):
        if not path.exists():
            raise UserError(f"{path} not found: run the pipeline up to `deepcluster evaluate`")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _version_with_digest(client: MlflowClient, name: str, digest: str):
    """The version of `name` registered from exactly this model, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(TAG_DIGEST) == digest), None)


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def resolve_metric(metric: str, metrics: dict) -> str:
    """The promotion metric `metric` names ("auto": the first of AUTO_METRICS with a value),
    refused unless it may decide champion and metrics.json has a value for it."""
    if metric == "auto":
        metric = next(
            (m for m in figures.AUTO_METRICS if metrics.get(m) is not None), figures.AUTO_METRICS[-1]
        )
    figures.require_promotable(metric)
    value = metrics.get(metric)
    if value is None:
        usable = [m for m in figures.PROMOTION_METRICS if metrics.get(m) is not None]
        raise UserError(
            f"metric {metric!r} has no value in metrics.json (got {value!r}); "
            f"choose one of: {', '.join(usable)}"
        )
    return metric


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


def _library_copy(tmp: Path) -> str:
    """This package's source without bytecode caches, to travel with the model."""
    source = Path(__file__).resolve().parent
    target = tmp / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def _input_example(art: Artifacts) -> dict:
    """One training image, PNG-encoded and in base64 as a server's caller sends it."""
    from PIL import Image

    from .data import load_cache

    image = np.asarray(load_cache(art.cache)[0]).transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return input_example(buffer.getvalue())


def _requirements() -> list[str]:
    """Exact versions of what the bundled code imports (skips MLflow's slow inference)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pinned
