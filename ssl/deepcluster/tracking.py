"""MLflow runs: one run per trained model, from its first epoch to its registration.

Every function uses MLflow's current tracking URI: `MLFLOW_TRACKING_URI` or `mlflow.set_tracking_uri`
when set, else MLflow's own default, `sqlite:///mlflow.db` in the working directory. A Dagster
resource sets the URI once and calls these functions; the CLI calls them with the default.

The run id is written to `artifacts/train/mlflow_run.json` beside the model, so the later steps
(evaluate, register), even in other processes such as DVC stages, log into the same run.
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT

from . import data, lineage
from .config import Params
from .io import write_json
from .paths import Artifacts
from .train import CHECKPOINT, EpochStats, load_checkpoint, params_fingerprint, saved_params

EXPERIMENT = "deepcluster"
RUN_FILE = "mlflow_run.json"
# EpochStats field -> metric name; each is logged with step = epoch
EPOCH_METRICS = {
    "loss": "train/loss",
    "kmeans_loss": "train/kmeans_loss",
    "nmi_prev": "train/nmi_prev",
    "nmi_labels": "train/nmi_labels",
    "reseeded": "train/reseeded_clusters",
    "lr": "train/lr",
    "largest_cluster_share": "train/largest_cluster_share",
    "seconds": "train/epoch_seconds",
}
EVAL_PREFIX = "eval/"


def experiment_id(name: str = EXPERIMENT) -> str:
    """The experiment's id, created on first use (another process may create it at the same time)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def start_training_run(
    params: Params,
    data_version: lineage.DataVersion,
    manifest_path: Path,
    tags: dict[str, str] | None = None,
    dagster_run_id: str | None = None,
) -> str:
    """Open a run for a training: params, lineage tags and the images as its dataset input."""
    commit = lineage.git_commit()
    run_tags = {
        "data_md5": data_version.md5,
        "data_source": data_version.source,
        "data_tracked": str(data_version.tracked).lower(),
        "params_fingerprint": params_fingerprint(params),
        **({MLFLOW_GIT_COMMIT: commit, "git_commit": commit} if commit else {}),
        **({"git_dirty": str(lineage.git_dirty()).lower()} if commit else {}),
        **({"dagster_run_id": dagster_run_id} if dagster_run_id else {}),
        **(tags or {}),
    }
    client = MlflowClient()
    run_id = client.create_run(experiment_id(), tags=run_tags).info.run_id
    flat = [Param(key, str(value)) for key, value in params.flat().items()]
    client.log_batch(run_id, params=flat)
    client.log_inputs(run_id, datasets=[_dataset_input(data_version, manifest_path)])
    return run_id


def _dataset_input(version: lineage.DataVersion, manifest_path: Path) -> DatasetInput:
    """The manifest as an MLflow dataset whose digest is the data version (DVC md5)."""
    manifest = data.read_manifest(manifest_path)
    source = version.folder or str(manifest_path)
    name = Path(version.folder).name if version.folder else "images"
    with warnings.catch_warnings():  # MLflow registers local paths twice and warns about it
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_polars(manifest, source=source, name=name, digest=version.md5)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag("data_md5", version.md5)]
    return DatasetInput(dataset._to_mlflow_entity(), tags=tags)  # what mlflow.log_input sends


class EpochLogger:
    """`on_epoch` callback: logs one epoch's statistics with step = epoch number."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()

    def __call__(self, stats: EpochStats) -> None:
        self.log(asdict(stats))

    def log(self, epoch: dict[str, Any]) -> None:
        """One epoch as a dict (a history.json entry); fields it lacks are skipped."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(epoch[field]), now, int(epoch["epoch"]))
            for field, name in EPOCH_METRICS.items()
            if epoch.get(field) is not None
        ]
        self.client.log_batch(self.run_id, metrics=metrics)


@contextmanager
def run_status(run_id: str):
    """Mark the run FINISHED when the block succeeds, FAILED (or KILLED on Ctrl-C) when not."""
    client = MlflowClient()
    try:
        yield run_id
    except KeyboardInterrupt:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def log_evaluation(run_id: str, metrics: dict[str, Any], eval_dir: Path) -> None:
    """Evaluation figures as `eval/<name>` metrics; metrics, curves and pictures as artifacts."""
    client = MlflowClient()
    now = int(time.time() * 1000)
    numbers = [
        Metric(EVAL_PREFIX + key, float(value), now, 0)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    client.log_batch(run_id, metrics=numbers)
    client.log_artifacts(run_id, str(eval_dir), artifact_path="eval")


# ---------------------------------------------------------------------------------------------
# The run file: which run a model in artifacts/ belongs to


def record_run(art: Artifacts, run_id: str) -> Path:
    return write_json(art.train_dir / RUN_FILE, {"run_id": run_id, "experiment": EXPERIMENT})


def recorded_run(art: Artifacts) -> str | None:
    path = art.train_dir / RUN_FILE
    return json.loads(path.read_text())["run_id"] if path.exists() else None


def _exists(run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


def training_run(
    art: Artifacts,
    params: Params,
    data_dir: Path | None = None,
    dagster_run_id: str | None = None,
    dvc_file: Path | str = lineage.DVC_FILE,
) -> str:
    """The run a training about to start in `art.train_dir` logs into, recorded in the run file.

    Resuming a checkpoint with the same parameters continues the run that wrote it. Anything else
    opens a new run; when a checkpoint will be resumed (e.g. under a longer `train.epochs`), its
    epochs so far are logged into the new run too, so the run shows the whole training.
    """
    previous = recorded_run(art)
    checkpoint = art.train_dir / CHECKPOINT
    if checkpoint.exists() and _exists(previous) and _logged_params(previous) == _flat(params):
        MlflowClient().update_run(previous, status=RunStatus.to_string(RunStatus.RUNNING))
        return previous
    version = lineage.data_version(art.manifest, data_dir, dvc_file)
    run_id = start_training_run(params, version, art.manifest, dagster_run_id=dagster_run_id)
    record_run(art, run_id)
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if state["fingerprint"] == params_fingerprint(params):  # else train() refuses it
            _log_history(run_id, state["history"])
    return run_id


def _flat(params: Params) -> dict[str, str]:
    return {key: str(value) for key, value in params.flat().items()}


def _logged_params(run_id: str) -> dict[str, str]:
    return MlflowClient().get_run(run_id).data.params


def _log_history(run_id: str, history: list[dict]) -> None:
    logger = EpochLogger(run_id)
    for epoch in history:
        logger.log(epoch)


def run_for(art: Artifacts) -> str:
    """The run of the model in `art`, for the steps after training.

    When this tracking store does not hold it (artifacts pulled with `dvc pull` onto another
    machine, another MLFLOW_TRACKING_URI), a run is opened here once for the model, tagged with
    the original run id, and found again by that tag next time.
    """
    recorded = recorded_run(art)
    if _exists(recorded):
        return recorded
    if recorded:
        found = MlflowClient().search_runs(
            [experiment_id()], filter_string=f"tags.origin_run_id = '{recorded}'", max_results=1
        )
        if found:
            return found[0].info.run_id
    return _adopt(art, origin=recorded)


def _adopt(art: Artifacts, origin: str | None) -> str:
    """A run for a model trained elsewhere: its own params (from model.pt), lineage and history."""
    params = saved_params(art.model)
    version = lineage.data_version(art.manifest)
    tags = {"origin_run_id": origin or "unknown"}
    run_id = start_training_run(params, version, art.manifest, tags=tags)
    with run_status(run_id):
        history = json.loads(art.history.read_text()) if art.history.exists() else []
        _log_history(run_id, history)
    return run_id


__all__ = [
    "EpochLogger",
    "experiment_id",
    "log_evaluation",
    "record_run",
    "recorded_run",
    "run_for",
    "run_status",
    "start_training_run",
    "training_run",
]
