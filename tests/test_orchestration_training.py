"""The graph-backed `checkpoint` asset: training runs in its own process under Dagster Pipes; a
real failure is retried and resumes the staged checkpoint, a stop is never retried and stops the
whole training process group."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from dagster import AssetKey, DagsterEventType, instance_for_test, materialize
from mlflow.tracking import MlflowClient

from orchestration.defs.assets import training
from orchestration.defs.assets.steps import ingest
from orchestration.defs.assets.training import checkpoint
from tests.conftest import FAST, ROOT
from tests.orchestration_fixtures import (
    fast_run_config,
    only_ops,
    project_instance_settings,
    resources_in,
)

pytestmark = pytest.mark.slow  # Pipes subprocesses train

STEP = "checkpoint.train_epochs"


def _checkpoint_metadata(result) -> dict:
    [event] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == AssetKey("checkpoint")
    ]
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


def test_training_runs_in_a_pipes_process_that_reports_every_epoch(
    digits_subset: Path, tmp_path: Path
) -> None:
    run_config = only_ops(fast_run_config(), "ingest", "checkpoint")
    with instance_for_test(overrides=project_instance_settings()) as instance:
        result = materialize(
            [ingest, checkpoint], instance=instance,
            resources=resources_in(tmp_path, digits_subset), run_config=run_config,
        )  # fmt: skip
        logs = [e for e in instance.all_logs(result.run_id) if e.step_key == STEP]
        # the step ran in the "gpu" pool, which the project's instance settings limit to one slot
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    assert result.success
    messages = [e.user_message for e in logs]
    assert any(m.startswith("epoch 1/2") for m in messages)  # through Pipes, from the process
    assert any("[pipes] session closed" in m or "pipes" in m.lower() for m in messages), messages
    metadata = _checkpoint_metadata(result)
    assert [r.data["epoch"] for r in metadata["per_epoch"].records] == [1, 2]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(metadata["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["mlflow.source.name"] == "dagster train_epochs"


def test_failed_training_op_is_retried_and_resumes_from_its_checkpoint(
    digits_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training process of tests/pipes_train_failing.py fails after epoch 1 of a fresh start."""
    failing = [sys.executable, "-m", "tests.pipes_train_failing"]
    monkeypatch.setattr(training, "training_command", lambda nproc: failing)
    run_config = only_ops(fast_run_config(), "ingest", "checkpoint")
    resources = resources_in(tmp_path, digits_subset)
    with instance_for_test(overrides=project_instance_settings()) as instance:
        result = materialize(
            [ingest, checkpoint], instance=instance, resources=resources, run_config=run_config
        )
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.step_key == STEP]

    assert result.success
    retries = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert [e.step_key for e in retries] == [STEP]
    assert "failed with exit code 1" in retries[0].event_specific_data.error.to_string()

    # the retry found the epoch-1 checkpoint and trained epoch 2 only
    assert any("resumed at epoch 1 of 2" in m for m in logs), logs
    assert sum(m.startswith("epoch 1/2") for m in logs) == 1
    assert sum(m.startswith("epoch 2/2") for m in logs) == 1
    metadata = _checkpoint_metadata(result)
    assert metadata["resumed_from_epoch"] == 1 and metadata["attempt"] == 2
    history = json.loads((tmp_path / "artifacts" / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    # the retry logged into the failed attempt's MLflow run, which ends FINISHED with both epochs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(metadata["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dagster_run_id"] == result.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_config_extends_a_finished_run(digits_subset: Path, tmp_path: Path) -> None:
    """`resume: true` continues the published run (with a constant learning rate: a cosine
    schedule depends on the run's length, so its checkpoint only resumes the same length)."""
    resources = resources_in(tmp_path, digits_subset)
    with instance_for_test() as instance:
        first = materialize(
            [ingest, checkpoint],
            instance=instance,
            resources=resources,
            run_config=only_ops(
                fast_run_config(train={"epochs": 1, "schedule": "constant"}),
                "ingest",
                "checkpoint",
            ),
        )
        assert _checkpoint_metadata(first)["resumed_from_epoch"] == 0
        longer = only_ops(
            fast_run_config(train={"epochs": 2, "schedule": "constant"}), "checkpoint"
        )
        longer["ops"]["checkpoint"]["config"]["resume"] = True
        extended = materialize(
            [checkpoint], instance=instance, resources=resources, run_config=longer
        )
    metadata = _checkpoint_metadata(extended)
    assert metadata["resumed_from_epoch"] == 1 and metadata["epochs"] == 2


def _descendants(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _materialize_command(tmp_path: Path, digits_subset: Path) -> tuple[list[str], dict]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'ssl'}{os.pathsep}{ROOT}",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    command = [
        sys.executable,
        "-m",
        "orchestration",
        "materialize",
        "--params",
        str(tmp_path / "params.yaml"),
        "--data",
        str(digits_subset),
        "--artifacts",
        str(tmp_path / "artifacts"),
    ]
    return command, env


def _stop_in_the_first_epoch(command: list[str], env: dict, stop) -> tuple[str, list[int], int]:
    """Start a 60-epoch materialisation, `stop(process)` once its first epoch is reported; the
    output after that line, the processes it had started, and the time the stop took."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = []
    while True:  # the training process reports its first epoch
        line = process.stdout.readline()
        assert line, "".join(output)[-3000:]
        output.append(line)
        if "epoch 1/60" in line:
            break
    family = _descendants(process.pid)
    assert family  # the training runs in processes of its own
    stop(process)
    began = time.monotonic()
    rest = process.communicate(timeout=120)[0]
    assert time.monotonic() - began < 60, "stopping took more than an epoch's worth"
    assert process.returncode != 0
    time.sleep(1)
    assert not [
        pid
        for pid in family
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    return rest, family, process.returncode


STOPPED_TRAINING = (
    "stopped by {} in checkpoint.train_epochs: training stopped: the Dagster run was terminated"
)


def test_sigterm_stops_a_materialisation_without_retry(digits_subset: Path, tmp_path: Path):
    """SIGTERM on `python -m orchestration materialize`: the training process group stops within
    an epoch, the step is not retried, the MLflow run ends KILLED, no process outlives the run,
    the model published before is untouched, and the stop is one line, no traceback."""
    command, env = _materialize_command(tmp_path, digits_subset)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**FAST, "train": {**FAST["train"], "epochs": 1}}))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = (tmp_path / "artifacts/train/model.pt").read_bytes()

    params.write_text(yaml.safe_dump({**FAST, "train": {**FAST["train"], "epochs": 60}}))
    rest, _, code = _stop_in_the_first_epoch(
        command, env, lambda process: os.kill(process.pid, signal.SIGTERM)
    )
    assert "STEP_UP_FOR_RETRY" not in rest and "epoch 2/60" not in rest
    [line] = rest.splitlines()  # what the stop says, and nothing else
    assert line.startswith(STOPPED_TRAINING.format("SIGTERM")), rest
    assert code == 128 + signal.SIGTERM
    assert (tmp_path / "artifacts/train/model.pt").read_bytes() == model
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("deepcluster")
    statuses = sorted(r.info.status for r in client.search_runs([experiment.experiment_id]))
    assert statuses == ["FINISHED", "KILLED"]


def test_ctrl_c_stops_a_materialisation_in_one_line(digits_subset: Path, tmp_path: Path):
    """Ctrl-C signals the terminal's whole foreground group, Dagster's helper processes too
    (each printed a KeyboardInterrupt traceback before): the stop is still one line."""
    command, env = _materialize_command(tmp_path, digits_subset)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**FAST, "train": {**FAST["train"], "epochs": 60}}))
    rest, _, code = _stop_in_the_first_epoch(
        command, env, lambda process: os.killpg(process.pid, signal.SIGINT)
    )
    [line] = rest.splitlines()
    assert line.startswith(STOPPED_TRAINING.format("SIGINT")), rest
    assert "; it had finished epoch " in line and line.endswith("/60"), line
    assert code == 128 + signal.SIGINT


def test_the_graph_materialises_a_deepercluster_model(digits_subset: Path, tmp_path: Path) -> None:
    """model.method: deepercluster through the whole graph as any method: training under Pipes,
    the embedding's features, clusters, evaluation and the registry, unchanged."""
    from orchestration.defs.assets.steps import (
        cluster_assignments,
        eval_report,
        features,
        raw_images,
        registered_model,
    )

    deeper = {"model": {"method": "deepercluster"}, "cluster": {"super_clusters": 3}}
    assets = [raw_images, ingest, checkpoint, features, cluster_assignments, eval_report,
              registered_model]  # fmt: skip
    ops = ("ingest", "checkpoint", "eval_report", "registered_model")
    with instance_for_test(overrides=project_instance_settings()) as instance:
        result = materialize(
            assets, instance=instance, resources=resources_in(tmp_path, digits_subset),
            run_config=only_ops(fast_run_config(**deeper), *ops),
        )  # fmt: skip
    assert result.success
    metadata = _checkpoint_metadata(result)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(metadata["mlflow_run_id"])
    assert run.data.params["model.method"] == "deepercluster"
    assert run.data.params["cluster.super_clusters"] == "3"
    assert run.data.params["cluster.reassign_every"] == "1"  # auto: 2 epochs are too few for 3
    registered = {e.asset_key for e in result.get_asset_materialization_events()}
    assert AssetKey("registered_model") in registered
