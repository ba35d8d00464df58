"""The training loop: cluster the features, train on the clusters, repeat.

Each epoch is a clustering (or, for a method that reclusters less often, the last one kept), then
one pass of SGD on its pseudo-labels. What a method clusters, which images it draws, its heads
and its loss live in its module under `deepcluster.methods`; this loop calls them through
`methods.Method` and holds no method of its own. The state is checkpointed atomically after every
epoch (`deepcluster.resume`) so that a killed run resumes where it stopped, with the same result
as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import augment as aug
from . import checkpoint as ckpt
from . import distributed as dist
from . import health as guard
from . import methods, resume
from .autoparams import is_colour
from .cluster import Clustering, nmi
from .config import Params
from .device import autocast, heap_reuse, memory_format, resolve_device, retune_threads
from .embed import ImageSource, compute_features, eval_batch_size
from .epochs import EpochStats, describe
from .errors import ParamError, UserError
from .health import ClusterHealth
from .io import write_json
from .models import DeepClusterNet, build_model, check_resolution
from .paths import TrainFiles
from .progress import bar, say
from .resume import LoopState, check_resumable
from .schedule import sgd, step_lr, steps_per_epoch

__all__ = ["Diverged", "ImageSource", "LoopState", "check_clusters", "check_resumable",
           "data_statistics", "head_sizes", "sgd", "train"]  # fmt: skip


class Diverged(UserError):
    """The loss became NaN or infinite: training stops before the state is saved again."""


@dataclass
class TrainResult:
    model: DeepClusterNet
    history: list[EpochStats]
    assignments: np.ndarray  # the last epoch's pseudo-labels (first head)
    resumed_from: int  # epochs already done when this call started


def head_sizes(params: Params) -> list[int]:
    """The width of each head the method of `params` trains (`methods.Method.head_sizes`)."""
    return methods.for_params(params).head_sizes()


def check_clusters(params: Params, images: int, given: Params | None = None) -> None:
    """Refuse more clusters than images, quoting `cluster.k` as the user gave it (`given`,
    before `auto` was resolved): a v2 head of a fraction of k would otherwise be what k-means
    reports."""
    sizes = head_sizes(params)
    k = int(params.cluster.k)
    if max(sizes + [k]) <= images:
        return
    written = (given or params).cluster.k
    shown = f"cluster.k = {written}" + (f" ({k})" if written != k else "")
    if k > images:
        raise ParamError(f"{shown}: needs at least k images, got {images}")
    raise ParamError(
        f"cluster.heads = {list(params.cluster.heads)}: with {shown} the largest head has "
        f"{max(sizes)} clusters, more than the {images} images"
    )


def all_features(model, source: ImageSource, params: Params, progress: bool, ranks) -> np.ndarray:
    """Embeddings of every image: each rank embeds its shard, every rank gets them all."""
    rows = dist.shard(len(source), ranks)
    part = (
        ImageSource(source.images[rows[0] : rows[-1] + 1], source.device)
        if ranks.active
        else source
    )
    local = compute_features(model, part, eval_batch_size(params), params.compute.amp, progress)
    return dist.gather_rows(local, len(source), ranks)


class EpochTrainer:
    """One pass of SGD over pseudo-labels. Every rank draws the same order and crops for the
    whole batch and trains on its share; with several ranks, DistributedDataParallel averages
    the gradients, so the optimisation is the one-process run's."""

    def __init__(self, method, model, optimizer, source, params, generator, photometric, ranks):
        self.method, self.model, self.optimizer, self.source = method, model, optimizer, source
        self.params, self.generator, self.photometric = params, generator, photometric
        self.ranks = ranks
        self.per_epoch = steps_per_epoch(params, len(source))

    def run(self, clusterings: list[Clustering], state: LoopState, progress: bool) -> tuple:
        """Returns (mean loss over all ranks, last learning rate)."""
        t, ranks, method = self.params.train, self.ranks, self.method
        plan = method.plan(clusterings, len(self.source), self.generator)
        # the step's module is rebuilt each epoch: the heads change with every clustering
        forward = dist.wrap(
            method.step_module(self.model), self.source.device, ranks, method.unused_parameters
        )
        head_opt = method.head_optimizer(self.model, self.source.device)
        touched = torch.zeros(len(self.source), dtype=torch.bool)
        self.model.train()
        total, seen, lr = 0.0, 0, 0.0
        starts = range(0, len(plan.order), int(t.batch_size))
        shown = bar(starts, desc="train", enabled=progress and ranks.main)
        for i, start in enumerate(shown):
            batch = plan.order[start : start + int(t.batch_size)]
            if len(batch) < 2 * ranks.world:  # batch norm needs two samples on every rank
                continue
            lr = step_lr(self.params, state.epoch * self.per_epoch + i, self.per_epoch)
            lr *= state.lr_scale
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if head_opt is not None:
                for group in head_opt.param_groups:
                    group["lr"] = self.head_lr(lr, state)
            mine = slice(ranks.rank, None, ranks.world)
            targets = [y[mine] for y in plan.targets(start, batch)]
            loss = self._step(batch, mine, targets, state, head_opt, forward)
            touched[torch.from_numpy(batch[mine])] = True
            total += loss * len(batch[mine])
            seen += len(batch[mine])
            shown.set_postfix(loss=f"{total / seen:.3f}")
        method.end_epoch(state, touched, ranks)
        total, seen = dist.sum_scalars([total, float(seen)], ranks)
        return total / max(seen, 1), lr

    def head_lr(self, trunk_lr: float, state: LoopState) -> float:
        """Heads that start from nothing with every clustering keep the base rate while the
        trunk's decays (following the trunk, they could not learn the last epochs' labels)."""
        return self.params.train.lr * state.lr_scale

    def _crops(self, x: torch.Tensor, count: int, scale, size: int, batch: int, mine: slice):
        """`count` random crops of this rank's images, stacked crop-major. The crops are drawn
        for the whole batch of `batch` images, so every rank draws the same and keeps its own."""
        a = self.params.augment
        theta = aug.crop_flip_params(count * batch, scale, a.hflip, self.generator)
        theta = theta.view(count, batch, 2, 3)[:, mine].reshape(-1, 2, 3)
        crops = aug.augment(x.repeat(count, 1, 1, 1), theta, size)
        crops = self.photometric(crops)
        return crops.contiguous(memory_format=memory_format(self.source.device))

    def _step(self, batch, mine, targets, state: LoopState, head_opt, forward) -> float:
        device = self.source.device
        idx = batch[mine]
        x = self.source.floats(idx)
        step = methods.StepBatch(
            images=x,
            indices=idx,
            targets=[y.to(device) for y in targets],
            size=len(batch),
            mine=mine,
            crops=lambda count, scale, side: self._crops(x, count, scale, side, len(batch), mine),
            generator=self.generator,
        )
        with autocast(device, self.params.compute.amp):
            loss = self.method.forward_loss(forward, step, state)
        self.optimizer.zero_grad(set_to_none=True)
        if head_opt is not None:
            head_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if head_opt is not None:
            head_opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise Diverged(
                f"training diverged in epoch {state.epoch + 1}: the loss is {value}; lower "
                f"train.lr (now {self.params.train.lr}); the checkpoint of epoch {state.epoch} "
                "is kept"
            )
        return value


# ---------------------------------------------------------------------------------------------
# The loop


def data_statistics(images: np.ndarray, sample: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the images in [0, 1], from an even sample of the cache."""
    step = max(1, len(images) // sample)
    rows = np.asarray(images[::step], dtype=np.float32) / 255.0
    return torch.from_numpy(rows.mean(axis=(0, 2, 3))), torch.from_numpy(rows.std(axis=(0, 2, 3)))


def _build(params: Params, images: np.ndarray, device: torch.device, ranks: dist.Ranks):
    """Model, trunk optimizer and generator for a fresh run of `params`."""
    t = params.train
    torch.manual_seed(t.seed)  # the same initial network on every rank
    model = build_model(params.model, head_sizes(params))
    if params.model.normalize == "dataset":
        model.normalize.set(*data_statistics(images))
    if params.compute.sync_bn and ranks.active:
        if device.type != "cuda":
            raise UserError("compute.sync_bn = true: synchronised batch norm needs CUDA")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=memory_format(device))
    torch.manual_seed(t.seed + 1_000_003 * ranks.rank)  # each rank's own photometric draws
    body = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    optimizer = sgd(body, device, t.lr, t.momentum, t.weight_decay)
    return model, optimizer, torch.Generator().manual_seed(t.seed)


def train(
    params: Params,
    images: np.ndarray,
    out_dir: Path,
    labels: np.ndarray | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    ranks: dist.Ranks = dist.ONE,
) -> TrainResult:
    """Run DeepCluster for `params.train.epochs` epochs, resuming from the checkpoint in `out_dir`.

    `params` must be resolved (no `auto` left, see `deepcluster.autoparams`). `stop_after` ends
    the call after that many epochs in total (a scheduled stop; the checkpoint is there to resume).
    `on_epoch` receives each epoch's statistics (MLflow, Dagster logs). Under torchrun the caller
    has joined the process group (`distributed.start`) and passes its `ranks`.
    """
    if params.auto_keys():
        raise ValueError(f"unresolved auto parameters: {', '.join(params.auto_keys())}")
    t, files = params.train, TrainFiles(Path(out_dir))
    check_resolution(params.model.arch, images.shape[-1])
    check_clusters(params, len(images))
    device = dist.device_for(resolve_device(params.compute.device), ranks)
    files.folder.mkdir(parents=True, exist_ok=True)
    method = methods.for_params(params)
    model, optimizer, generator = _build(params, images, device, ranks)
    state = LoopState()
    if files.checkpoint.exists():
        state = resume.load(files.checkpoint, params, model, optimizer, generator, ranks)
    start_epoch = state.epoch
    source = ImageSource(images, device)
    photometric = aug.photometric(params.augment, is_colour(images), images.shape[-1])
    trainer = EpochTrainer(method, model, optimizer, source, params, generator, photometric, ranks)
    last_epoch = t.epochs if stop_after is None else min(t.epochs, stop_after)
    show = progress and ranks.main
    ctx = methods.Context(
        model, source, params, lambda: all_features(model, source, params, show, ranks), ranks, show
    )
    with heap_reuse(device.type == "cpu"):  # CPU steps reuse freed blocks, not fault them in
        for epoch in range(start_epoch, last_epoch):
            if change := retune_threads(params.compute.threads):  # the load changes
                say(change, show)
            stats = _epoch(epoch, method, ctx, state, trainer, labels)
            resume.save(files.checkpoint, model, optimizer, generator, state, params, ranks)
            say(describe(stats, t.epochs), show)
            if ranks.main:
                write_json(files.history, [asdict(h) for h in state.history])
                if on_epoch is not None:
                    on_epoch(stats)
    if last_epoch == t.epochs and ranks.main:
        ckpt.export_model(model, params, files.model)
    assert state.assignments is not None, "no epoch ran and no checkpoint was found"
    return TrainResult(model.eval(), state.history, state.assignments, start_epoch)


def _epoch(
    epoch: int, method: methods.Method, ctx: methods.Context, state: LoopState, trainer, labels
) -> EpochStats:
    """One epoch: cluster (again from other seeds if the clusters collapsed), or keep the last
    clustering when the method reclusters less often, then train."""
    began, seed = time.perf_counter(), ctx.params.train.seed
    action = None
    if method.reclusters(epoch):
        clusterings = method.cluster(ctx, state, seed + epoch)
        health = ClusterHealth.of(clusterings[0], state.assignments)
        action = guard.react(health, state)
        if action is not None:  # collapsed: cluster again from other seeds, train more gently
            clusterings = method.cluster(ctx, state, seed + 104729 * (epoch + 1))
            health = ClusterHealth.of(clusterings[0], state.assignments)
    else:
        clusterings = method.kept(state)
        health = ClusterHealth.of(clusterings[0], state.assignments)
    loss, lr = trainer.run(clusterings, state, ctx.progress)
    ids = clusterings[0].assignments
    stats = EpochStats(
        epoch=epoch + 1,
        loss=loss,
        kmeans_loss=clusterings[0].loss,
        nmi_prev=health.nmi_prev,
        nmi_labels=None if labels is None else nmi(labels, ids),
        reseeded=clusterings[0].reseeded,
        lr=lr,
        largest_cluster_share=health.largest_share,
        seconds=time.perf_counter() - began,
        guard=action,
    )
    state.epoch, state.assignments = epoch + 1, ids
    state.history.append(stats)
    return stats
