"""The graph-backed `checkpoint` asset: a training op that fails after an epoch is retried by its
RetryPolicy and resumes from the epoch checkpoint instead of starting again."""

import json
from pathlib import Path

from dagster import AssetKey, DagsterEventType, instance_for_test, materialize
from mlflow.tracking import MlflowClient

from orchestration.assets import image_cache, image_manifest
from orchestration.training import checkpoint
from tests.orchestration_fixtures import (
    fast_run_config,
    only_ops,
    project_instance_settings,
    resources_in,
)

STEP = "checkpoint.train_epochs"


def _checkpoint_metadata(result) -> dict:
    [event] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == AssetKey("checkpoint")
    ]
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


def test_failed_training_op_is_retried_and_resumes_from_its_checkpoint(
    digits_subset: Path,
    tmp_path: Path,
) -> None:
    run_config = only_ops(fast_run_config(), "image_cache", "checkpoint")
    run_config["ops"]["checkpoint"]["config"]["fail_after_epoch"] = 1
    resources = resources_in(tmp_path, digits_subset)
    with instance_for_test(overrides=project_instance_settings()) as instance:
        result = materialize(
            [image_manifest, image_cache, checkpoint],
            instance=instance,
            resources=resources,
            run_config=run_config,
        )
        logs = [e.user_message for e in instance.all_logs(result.run_id) if e.step_key == STEP]
        # the step ran in the "gpu" pool, which the project's instance settings limit to one slot
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1

    assert result.success
    retries = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert [e.step_key for e in retries] == [STEP]
    assert any(
        "injected failure after epoch 1" in e.event_specific_data.error.to_string() for e in retries
    )

    # the retry found the epoch-1 checkpoint and trained epoch 2 only
    assert any("resumed at epoch 1 of 2" in m for m in logs), logs
    assert sum("epoch 1/2" in m for m in logs) == 1 and sum("epoch 2/2" in m for m in logs) == 1
    metadata = _checkpoint_metadata(result)
    assert metadata["resumed_from_epoch"] == 1 and metadata["attempt"] == 2
    history = json.loads((tmp_path / "artifacts" / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]

    # the retry logged into the failed attempt's MLflow run, which ends FINISHED with both epochs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(metadata["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dagster_run_id"] == result.run_id
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_config_extends_a_finished_run(digits_subset: Path, tmp_path: Path) -> None:
    """`resume: true` keeps the checkpoint to train more epochs (with a constant learning rate: a
    cosine schedule depends on the run's length, so its checkpoint only resumes the same length)."""
    resources = resources_in(tmp_path, digits_subset)
    with instance_for_test() as instance:
        first = materialize(
            [image_manifest, image_cache, checkpoint],
            instance=instance,
            resources=resources,
            run_config=only_ops(
                fast_run_config(train={"epochs": 1, "schedule": "constant"}),
                "image_cache",
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
