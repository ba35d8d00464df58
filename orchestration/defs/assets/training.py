"""The `checkpoint` asset: DeepCluster training as a graph of ops, prepare -> train_epochs -> export.

`train_epochs` is the GPU step: it carries the "gpu" pool (two runs never train on one GPU at once,
given a pool limit of 1, see docs/orchestration.md), Kubernetes resource tags for per-step pods, and a
RetryPolicy. It runs the training outside the Dagster process, through Dagster Pipes
(`orchestration/pipes_train.py`, under torchrun when `compute.nproc` > 1), which reports every epoch and the
MLflow run back. Only real failures are retried, and a retry resumes the staged checkpoint;
terminating the Dagster run stops the training's whole process group and is never retried.
"""

import os
import signal
import subprocess
import sys
from typing import Any

from dagster import (
    AssetIn,
    AutomationCondition,
    DagsterExecutionInterruptedError,
    Failure,
    In,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Output,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    RetryPolicy,
    config_mapping,
    graph_asset,
    op,
    open_pipes_session,
)

from deepcluster import lineage, pipeline

from ... import metadata as md
from ...config import ROOT, TrainingConfig, training_params
from ...errors import user_errors_fail_plainly
from ...versions import code_version
from ..resources import ArtifactStore, ComputeResource, MlflowTracking

TRAIN_RETRIES = 2
STOP_GRACE_SECONDS = 30  # how long a stopped training may take to mark its run KILLED and exit
# Per-step pods under the k8s executor ask for one GPU.
GPU_TAGS = {
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
}


@op(
    description="Validate the parameters against the ingested images and resolve `auto` values.",
    ins={"image_cache": In(Nothing)},  # ordering only: the cache is read from its file
)
def prepare_training(
    context: OpExecutionContext,
    config: TrainingConfig,
    artifacts: ArtifactStore,
    compute: ComputeResource,
) -> dict:
    art = artifacts.layout
    params = training_params(config, compute.section())
    with user_errors_fail_plainly():
        manifest, images = pipeline.ingested(art)
        resolved, notes = pipeline.training_params(params, art, manifest, images)
    for key, note in notes.items():
        context.log.info(f"auto: {key} = {note}")
    start = "resuming a staged checkpoint if there is one" if config.resume else "from scratch"
    context.log.info(f"training {resolved.train.epochs} epochs on {len(images)} images ({start})")
    # a plan of plain values: the only thing these ops pass through the IO manager
    return {"params": params.to_dict(), "fresh": not config.resume}


def training_command(nproc: int) -> list[str]:
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        return [*launcher, "-m", "orchestration.pipes_train"]
    return [sys.executable, "-m", "orchestration.pipes_train"]


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the training's process group (torchrun and every rank), SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_training(context: OpExecutionContext, extras: dict, nproc: int) -> list[dict]:
    """Run the training process under Pipes; its custom messages, in order."""
    with open_pipes_session(
        context=context,
        context_injector=PipesTempFileContextInjector(),
        message_reader=PipesTempFileMessageReader(),
        extras=extras,
    ) as session:
        process = subprocess.Popen(
            training_command(nproc),
            cwd=ROOT,
            env={**os.environ, **session.get_bootstrap_env_vars()},
            start_new_session=True,  # its own process group, stopped as one
        )
        try:
            code = process.wait()
        except (DagsterExecutionInterruptedError, KeyboardInterrupt):
            context.log.info("run terminated: stopping the training process group")
            _stop_group(process)
            raise Failure(
                "training stopped: the Dagster run was terminated (its MLflow run is KILLED; "
                "the staged checkpoint is kept for `resume: true`)",
                allow_retries=False,
            ) from None
    messages = list(session.get_custom_messages())
    user_errors = [m["user_error"] for m in messages if "user_error" in m]
    if user_errors:  # a person has to fix it: retrying cannot
        raise Failure(user_errors[0], allow_retries=False)
    if code != 0:
        raise RuntimeError(f"the training process failed with exit code {code}")
    return messages


@op(
    description="DeepCluster epochs in a training process: cluster -> train on pseudo-labels.",
    retry_policy=RetryPolicy(max_retries=TRAIN_RETRIES),
    pool="gpu",
    tags=GPU_TAGS,
)
def train_epochs(
    context: OpExecutionContext,
    plan: dict,
    artifacts: ArtifactStore,
    compute: ComputeResource,
    mlflow: MlflowTracking,
) -> Output[dict]:
    attempt = context.retry_number + 1
    extras = {
        "params": {**plan["params"], "compute": compute.section()},
        "artifacts": artifacts.root,
        "dvc_file": artifacts.dvc_file,
        "fresh": plan["fresh"] and attempt == 1,  # retries resume the staged checkpoint
        "dagster_run_id": context.run.run_id,
    }
    if attempt > 1:
        context.log.info(f"attempt {attempt}: resuming the staged checkpoint")
    messages = run_training(context, extras, compute.nproc)
    [result] = [m["result"] for m in messages if "result" in m]
    if result["resumed_from"]:
        context.log.info(f"resumed at epoch {result['resumed_from']} of {result['epochs']}")
    context.log.info(f"MLflow run {result['mlflow_run_id']}: {mlflow.run_url(result['mlflow_run_id'])}")
    # a Pipes session makes Dagster take returned values as events: wrap the output explicitly
    return Output({**result, "attempt": attempt})


@op(description="Describe the published model and its run.")
def export_model(
    context: OpExecutionContext, summary: dict, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> Output[None]:
    art = artifacts.layout
    history = summary["history"]
    if not history:
        raise Failure("training recorded no epoch")
    last = history[-1]
    run_id = summary["mlflow_run_id"]
    return Output(
        None,
        metadata={
            "epochs": len(history),
            "final_loss": last["loss"],
            "final_nmi_prev": last["nmi_prev"],
            "final_nmi_labels": last["nmi_labels"],
            "largest_cluster_share": last["largest_cluster_share"],
            "per_epoch": md.epoch_table(history),
            "resumed_from_epoch": summary["resumed_from"],
            "attempt": summary["attempt"],
            "auto": md.as_json(summary["auto"]),
            "params": md.as_json(summary["params"]),
            "mlflow_run_id": run_id,
            "mlflow_run": MetadataValue.url(mlflow.run_url(run_id)),
            "git_commit": lineage.git_commit(ROOT) or "not a git checkout",
            "git_dirty": bool(lineage.git_dirty(ROOT)),
            "path": MetadataValue.path(str(art.model)),
        },
    )


@config_mapping
def training_config(config: TrainingConfig) -> dict[str, Any]:
    """One config block for the asset (`ops: checkpoint: config:`), handed to prepare_training."""
    return {"prepare_training": {"config": config.model_dump()}}


@graph_asset(
    group_name="deepcluster",
    config=training_config,
    code_version=code_version("train"),
    kinds={"pytorch"},
    automation_condition=AutomationCondition.eager(),
    description="The trained DeepCluster network (artifacts/train/model.pt, its params and history).",
    ins={"image_cache": AssetIn(dagster_type=Nothing)},
)
def checkpoint(image_cache):
    return export_model(train_epochs(prepare_training(image_cache)))
