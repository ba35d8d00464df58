"""MLflow runs: one run per trained model, from its first epoch to its registration. The store is
`MLFLOW_TRACKING_URI`, else `mlflow.db` at the project root (the nearest folder up holding
params.yaml) with its artifacts beside it; the run id is written beside the model, so the later
steps, even in other processes, log into the same run."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_RUN_NAME,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

from . import data, epochs, lineage, lock
from .config import Params
from .errors import Stopped, UserError
from .io import write_json
from .paths import Artifacts

# MLflow's routine INFO lines (database set-up, the metrics monitor starting and stopping) would
# otherwise interleave with every command's own output
for _chatty in ("mlflow.store.db.utils", "mlflow.system_metrics", "alembic.runtime.migration"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

EXPERIMENT = "deepcluster"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # not a GenAI experiment
# MLflow 3.17's UI shows every experiment in its GenAI view (traces, "Detect Issues") unless the
# browser switched the sidebar to "Machine learning" or the link asks for it; the tag above no
# longer decides it there, so every link this project prints asks
UI_VIEW = "?workflowType=machine_learning"
EVAL_PREFIX = "eval/"
PROJECT_MARKERS = ("params.yaml", "dvc.yaml")


def project_root(start: Path | None = None) -> Path:
    """The nearest folder up from `start` (the working directory) holding params.yaml."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    return here


def store_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's own sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def use_store(create: bool = True) -> str:
    """Point MLflow at the store; with create=False a missing local database is a user error
    (instead of an empty new one that then has no registered model)."""
    uri = store_uri()
    database = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if database is not None and not create and not database.exists():
        raise UserError(
            f"no MLflow store at {database}: run the pipeline first, run this "
            "from the project folder, or set MLFLOW_TRACKING_URI"
        )
    mlflow.set_tracking_uri(uri)
    if database is not None:
        _initialise_once(uri, database)
    return uri


_initialised: set[str] = set()


def _initialise_once(uri: str, database: Path) -> None:
    """Create (or migrate) a local database's tables under a lock: two processes opening a
    fresh mlflow.db at once would both run the migrations, and one would crash."""
    if uri in _initialised:
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with lock.waiting(database, -1, "a migration"):
        MlflowClient(uri).search_experiments(max_results=1)
    _initialised.add(uri)


def _artifact_location(uri: str) -> str | None:
    """Beside a local database; a tracking server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(name: str = EXPERIMENT) -> str:
    """The experiment's id, created on first use (another process may create it at the same time)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found:
        for key, value in EXPERIMENT_KIND.items():  # a store from before the tag
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    location = _artifact_location(mlflow.get_tracking_uri())
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def ui_link(ui_url: str, route: str) -> str:
    """A link into `mlflow ui` at `ui_url` (e.g. route `models/deepcluster/versions/3`) that opens
    in the classic view whatever the browser last chose."""
    return f"{ui_url.rstrip('/')}/#/{route}{UI_VIEW}"


# short enough that MLflow's run list, which shows about 23 characters, still shows the minute
SHORT_METHOD = {"deepcluster": "v1", "deepcluster-v2": "v2", "deepercluster": "deeper"}


def run_name(params: Params, data_md5: str) -> str:
    """`<method> <date> data <data version>`: what a person tells runs apart by, method first so
    the UI's shortened names still differ (the parameters' hash is the params_fingerprint tag)."""
    method = SHORT_METHOD.get(params.model.method, params.model.method)
    return f"{method} {time.strftime('%Y-%m-%d %H:%M')} data {data_md5[:8]}"


def start_training_run(
    params: Params,
    data_version: lineage.DataVersion,
    manifest_path: Path,
    tags: dict[str, str] | None = None,
    source: str = "deepcluster train",
) -> str:
    """Open a run for a training: params, lineage tags and the images as its dataset input."""
    from .checkpoint import params_fingerprint  # torch (~2 s): logging a curation needs none

    commit = lineage.git_commit()
    run_tags = {
        MLFLOW_RUN_NAME: run_name(params, data_version.md5),
        MLFLOW_SOURCE_NAME: source,
        MLFLOW_SOURCE_TYPE: "JOB" if "dagster" in source else "LOCAL",
        "data_md5": data_version.md5,
        "data_source": data_version.source,
        "data_tracked": str(data_version.tracked).lower(),
        "params_fingerprint": params_fingerprint(params),
        **({MLFLOW_GIT_COMMIT: commit, "git_commit": commit} if commit else {}),
        **({"git_dirty": str(lineage.git_dirty()).lower()} if commit else {}),
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

    def __call__(self, stats) -> None:
        epoch = asdict(stats)
        self.log(epoch)
        if epoch.get("guard"):  # the cluster-health guard acted: say so where people look
            self.client.set_tag(self.run_id, f"guard/epoch_{epoch['epoch']}", epoch["guard"])

    def log(self, epoch: dict[str, Any]) -> None:
        """One epoch as a dict (a history.json entry); fields it lacks are skipped."""
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, value, now, int(epoch["epoch"]))
            for name, value in epochs.metrics(epoch).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)


@contextmanager
def run_status(run_id: str, system_metrics: bool = False):
    """Mark the run FINISHED when the block succeeds, KILLED when it is interrupted (Ctrl-C,
    SIGTERM), FAILED otherwise; with `system_metrics`, CPU/memory/GPU are sampled meanwhile."""
    client = MlflowClient()
    monitor = _system_monitor(run_id) if system_metrics else None
    try:
        yield run_id
    except (KeyboardInterrupt, Stopped):
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def _system_monitor(run_id: str):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True)
    monitor.start()
    return monitor


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


def record_run(path: Path, run_id: str) -> Path:
    return write_json(path, {"run_id": run_id, "experiment": EXPERIMENT})


def recorded_run(path: Path) -> str | None:
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
    version: lineage.DataVersion,
    history: list[dict],
    tags: dict[str, str] | None = None,
    source: str = "deepcluster train",
) -> str:
    """The run a training about to start in `art.staging_dir` logs into, recorded there.

    Resuming a staged checkpoint of the same parameters continues the run that wrote it.
    Anything else opens a new run; the epochs a resumed checkpoint already holds (`history`,
    e.g. under a longer `train.epochs`) are logged into it too, so the run shows the whole training.
    """
    run_file = art.staging.run_file
    previous = recorded_run(run_file)
    if history and _exists(previous) and _logged_params(previous) == _flat(params):
        MlflowClient().update_run(previous, status=RunStatus.to_string(RunStatus.RUNNING))
        return previous
    run_id = start_training_run(params, version, art.manifest, tags=tags, source=source)
    record_run(run_file, run_id)
    _log_history(run_id, history)
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
    recorded = recorded_run(art.run_file)
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
    """A run for a model trained elsewhere: its own params, lineage and history."""
    from .checkpoint import saved_params

    params = saved_params(art.model)
    version = lineage.recorded_version(art)
    tags = {"origin_run_id": origin or "unknown"}
    run_id = start_training_run(params, version, art.manifest, tags=tags)
    with run_status(run_id):
        history = json.loads(art.history.read_text()) if art.history.exists() else []
        _log_history(run_id, history)
    return run_id
