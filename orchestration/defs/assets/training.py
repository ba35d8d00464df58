"""The `checkpoint` asset: train_epochs (the train step in a Pipes process, in the "gpu" pool;
retried from the staged checkpoint, never after a stop) -> export_model."""

import os
import signal
import subprocess
import sys
from typing import Any

import dagster as dg

from deepcluster import epochs, pipeline

from ... import metadata as md
from ...config import ROOT, TrainingConfig, params_from_config
from ..resources import ArtifactStore, ComputeResource, MlflowTracking
from . import EAGER, GROUP

TRAIN_RETRIES = 2
STOP_GRACE_SECONDS = 30  # how long a stopped training may take to mark its run KILLED and exit
GPU_TAGS = {  # a per-step pod (k8s executor) asks for one GPU
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
}


def training_command(nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "orchestration.pipes_train"]


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


def run_training(context: dg.OpExecutionContext, extras: dict, nproc: int) -> list[dict]:
    """Run the training process under Pipes; its custom messages, in order."""
    with dg.open_pipes_session(context=context, extras=extras,
                               context_injector=dg.PipesTempFileContextInjector(),
                               message_reader=dg.PipesTempFileMessageReader()) as session:
        process = None
        try:  # a stop while the process starts (a fork takes seconds) is a stop, never retried
            process = subprocess.Popen(training_command(nproc), cwd=ROOT, start_new_session=True,
                                       env={**os.environ, **session.get_bootstrap_env_vars()})
            code = process.wait()
        except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
            context.log.info("run terminated: stopping the training process group")
            if process is not None:
                _stop_group(process)
            raise dg.Failure("training stopped: the Dagster run was terminated (its MLflow run is "
                             "KILLED; the staged checkpoint is kept for `resume: true`)",
                             allow_retries=False) from None
    messages = list(session.get_custom_messages())
    user_errors = [m["user_error"] for m in messages if "user_error" in m]
    if user_errors:  # a person has to fix it: retrying cannot
        raise dg.Failure(user_errors[0], allow_retries=False)
    if code != 0:
        raise RuntimeError(f"the training process failed with exit code {code}")
    return messages


@dg.op(retry_policy=dg.RetryPolicy(max_retries=TRAIN_RETRIES), pool="gpu", tags=GPU_TAGS,
       ins={"image_cache": dg.In(dg.Nothing)})  # ordering only: the cache is read from its file
def train_epochs(context: dg.OpExecutionContext, config: TrainingConfig, artifacts: ArtifactStore,
                 compute: ComputeResource, mlflow: MlflowTracking) -> dg.Output[dict]:
    """DeepCluster epochs in a training process: cluster -> train on pseudo-labels."""
    attempt = context.retry_number + 1
    extras = {
        "params": params_from_config(config, compute.section()).to_dict(),
        "artifacts": artifacts.root, "dvc_file": artifacts.dvc_file,
        "dagster_run_id": context.run.run_id,
        "fresh": not config.resume and attempt == 1,  # retries resume the staged checkpoint
    }
    if attempt > 1:
        context.log.info(f"attempt {attempt}: resuming the staged checkpoint")
    [result] = [m["result"] for m in run_training(context, extras, compute.nproc) if "result" in m]
    if result["resumed_from"]:
        context.log.info(f"resumed at epoch {result['resumed_from']} of {result['epochs']}")
    run = result["mlflow_run_id"]
    context.log.info(f"MLflow run {run}: {mlflow.run_url(run)}")
    # in a Pipes session Dagster takes returned values as events: wrap the output explicitly
    return dg.Output({**result, "attempt": attempt})


@dg.op
def export_model(summary: dict, artifacts: ArtifactStore, mlflow: MlflowTracking) -> dg.Output:
    """Describe the published model and its run."""
    history, run_id = summary["history"], summary["mlflow_run_id"]
    if not history:
        raise dg.Failure("training recorded no epoch")
    last = history[-1]
    return dg.Output(None, metadata={
        "epochs": len(history), **md.figures({"final_loss": last["loss"],
        "final_nmi_prev": last["nmi_prev"], "final_nmi_labels": last["nmi_labels"],
        "largest_cluster_share": last["largest_cluster_share"]}),
        "per_epoch": md.table(history, epochs.columns()),
        "resumed_from_epoch": summary["resumed_from"], "attempt": summary["attempt"],
        "auto": md.as_json(summary["auto"]), "params": md.as_json(summary["params"]),
        "mlflow_run_id": run_id, "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        **summary["code"], "path": dg.MetadataValue.path(str(artifacts.layout.model)),
    })  # fmt: skip


@dg.config_mapping
def training_config(config: TrainingConfig) -> dict[str, Any]:
    """One config block for the asset (`ops: checkpoint: config:`), handed to train_epochs."""
    return {"train_epochs": {"config": config.model_dump()}}


@dg.graph_asset(group_name=GROUP, config=training_config, code_version=pipeline.code_version("train"),
                kinds={"pytorch"}, automation_condition=EAGER,
                ins={"image_cache": dg.AssetIn(dagster_type=dg.Nothing)})
def checkpoint(image_cache):
    """The trained DeepCluster network (artifacts/train/model.pt, its params and history)."""
    return export_model(train_epochs(image_cache))
