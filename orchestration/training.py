"""The `checkpoint` asset: DeepCluster training as a graph of ops, prepare -> train_epochs -> export.

`train_epochs` is the GPU step: it carries the "gpu" pool (two runs never train on one GPU at once,
given a pool limit of 1, see docs/orchestration.md), Kubernetes resource tags for per-step pods, and a
RetryPolicy. A retry resumes from the last epoch checkpoint, because `deepcluster.train` always
continues from `artifacts/train/checkpoint.pt`; only `prepare_training`, which runs once per
materialisation, clears that file so that a new materialisation trains from scratch.
"""

from collections.abc import Callable
from dataclasses import asdict

from dagster import (
    AssetIn,
    Failure,
    In,
    MetadataValue,
    Nothing,
    OpExecutionContext,
    Output,
    RetryPolicy,
    config_mapping,
    graph_asset,
    op,
)

from deepcluster import (
    augment,
    cluster,
    data,
    device,
    lineage,
    models,
    pipeline,
    sampler,
    tracking,
    train,
)
from deepcluster.config import params_from_dict
from deepcluster.train import EpochStats

from . import metadata as md
from .config import ROOT, TrainingConfig, training_params
from .errors import user_errors_fail_plainly
from .resources import ArtifactStore, ComputeResource, MlflowTracking
from .versions import code_version

TRAIN_RETRIES = 2
# Per-step pods under the k8s executor ask for one GPU.
GPU_TAGS = {
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
}


@op(
    description="Validate the parameters against the image cache; clear a previous run's checkpoint.",
    ins={"image_cache": In(Nothing)},  # ordering only: the cache is read from its file
)
def prepare_training(
    context: OpExecutionContext,
    config: TrainingConfig,
    artifacts: ArtifactStore,
    compute: ComputeResource,
) -> dict:
    art = artifacts.layout
    with user_errors_fail_plainly():
        images = data.load_cache(pipeline.require(art.cache, "ingest"))
        params = training_params(config, images.shape[-1], compute.device, compute.workers)
    if not config.resume:
        for name in (train.CHECKPOINT, train.HISTORY, train.MODEL):
            (art.train_dir / name).unlink(missing_ok=True)
    context.log.info(
        f"training {params.train.epochs} epochs on {images.shape[0]} images "
        f"({'resuming if a checkpoint is there' if config.resume else 'from scratch'})"
    )
    # a plan of plain values: the only thing these ops pass through the IO manager
    return {"params": params.to_dict(), "fail_after_epoch": config.fail_after_epoch}


def epoch_logger(context: OpExecutionContext, epochs: int) -> Callable[[EpochStats], None]:
    def log(stats: EpochStats) -> None:
        context.log.info(md.epoch_line(asdict(stats), epochs))

    return log


def fault_injector(
    context: OpExecutionContext, fail_after: int | None
) -> Callable[[EpochStats], None]:
    """Testing only: stop the first attempt after epoch `fail_after`, once its checkpoint is saved."""

    def maybe_fail(stats: EpochStats) -> None:
        if fail_after is not None and context.retry_number == 0 and stats.epoch == fail_after:
            raise RuntimeError(
                f"fail_after_epoch={fail_after}: injected failure after epoch {stats.epoch}"
            )

    return maybe_fail


@op(
    description="DeepCluster epochs: features -> PCA/whiten/L2 -> k-means -> train on pseudo-labels.",
    retry_policy=RetryPolicy(max_retries=TRAIN_RETRIES),
    pool="gpu",
    tags=GPU_TAGS,
)
def train_epochs(
    context: OpExecutionContext, plan: dict, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> dict:
    params = params_from_dict(plan["params"])
    art = artifacts.layout
    if (art.train_dir / train.CHECKPOINT).exists():
        context.log.info(
            f"attempt {context.retry_number + 1}: resuming from {art.train_dir / train.CHECKPOINT}"
        )
    # a retry resuming the checkpoint continues the MLflow run of the failed attempt
    run_id = tracking.training_run(
        art, params, artifacts.data_path, context.run.run_id, artifacts.dvc_file
    )
    context.log.info(f"MLflow run {run_id}: {mlflow.run_url(run_id)}")
    callbacks = [
        epoch_logger(context, params.train.epochs),
        tracking.EpochLogger(run_id),
        fault_injector(context, plan["fail_after_epoch"]),
    ]

    def on_epoch(stats: EpochStats) -> None:
        for callback in callbacks:
            callback(stats)

    with user_errors_fail_plainly(), tracking.run_status(run_id):
        result = pipeline.train_step(params, art, on_epoch=on_epoch, progress=False)
    if result.resumed_from:
        context.log.info(f"resumed at epoch {result.resumed_from} of {params.train.epochs}")
    return {
        "history": [asdict(h) for h in result.history],
        "resumed_from": result.resumed_from,
        "attempt": context.retry_number + 1,
        "params": plan["params"],
        "mlflow_run_id": run_id,
    }


@op(description="Check that the exported model loads and describe the run.")
def export_model(
    context: OpExecutionContext, summary: dict, artifacts: ArtifactStore, mlflow: MlflowTracking
) -> Output[None]:
    art = artifacts.layout
    with user_errors_fail_plainly():
        model = train.load_model(pipeline.require(art.model, "train"))
    history = summary["history"]
    if not history:
        raise Failure("training recorded no epoch")
    last = history[-1]
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
            "parameters": sum(p.numel() for p in model.parameters()),
            "params": md.as_json(summary["params"]),
            "mlflow_run_id": summary["mlflow_run_id"],
            "mlflow_run": MetadataValue.url(mlflow.run_url(summary["mlflow_run_id"])),
            "git_commit": lineage.git_commit(ROOT) or "not a git checkout",
            "git_dirty": bool(lineage.git_dirty(ROOT)),
            "path": MetadataValue.path(str(art.model)),
        },
    )


@config_mapping
def training_config(config: TrainingConfig) -> dict:
    """One config block for the asset (`ops: checkpoint: config:`), handed to prepare_training."""
    return {"prepare_training": {"config": config.model_dump()}}


@graph_asset(
    group_name="deepcluster",
    config=training_config,
    code_version=code_version(pipeline, train, models, cluster, augment, sampler, device),
    kinds={"pytorch"},
    description="The trained DeepCluster network (artifacts/train/model.pt) and its epoch checkpoint.",
    ins={"image_cache": AssetIn(dagster_type=Nothing)},
)
def checkpoint(image_cache):
    return export_model(train_epochs(prepare_training(image_cache)))
