"""The DeepCluster loop: cluster the features, train on the clusters, repeat.

One loop for both methods; each epoch is a clustering, then one pass of SGD on its pseudo-labels:

- `deepcluster` (v1, Caron et al. 2018): embed every image (eval mode, no augmentation) ->
  PCA-whiten + L2 -> k-means -> draw images uniformly over clusters -> fresh linear head -> SGD
  on augmented crops. The head is new every epoch, so it keeps the base learning rate while the
  trunk's decays: a head that starts from zero with a decayed rate cannot learn the new labels.
- `deepcluster-v2` (Caron et al. 2020): spherical k-means, one per prototype head, on the unit
  embeddings the previous epoch's training pass stored (a memory bank, so no extra pass) ->
  prototypes := centroids -> every image once, as two global and several local crops, each crop
  trained to predict its image's clusters with a temperature softmax over prototype similarities.

The state is checkpointed atomically after every epoch so that a killed run resumes where it
stopped, with the same result as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import augment as aug
from . import checkpoint as ckpt
from . import distributed as dist
from . import health as guard
from .autoparams import is_colour
from .cluster import Clustering, cluster_features, nmi
from .config import Params
from .device import autocast, heap_reuse, memory_format, resolve_device, set_threads
from .embed import ImageSource, compute_features, eval_batch_size
from .epochs import EpochStats, describe
from .errors import ParamError, UserError
from .health import ClusterHealth
from .io import write_json
from .models import DeepClusterNet, build_model, check_resolution
from .paths import TrainFiles
from .progress import bar, say
from .sampler import uniform_over_clusters

GLOBAL_CROPS = 2  # v2: crops per image that feed the memory bank (the reference uses two)


class Diverged(UserError):
    """The loss became NaN or infinite: training stops before the state is saved again."""


@dataclass
class TrainResult:
    model: DeepClusterNet
    history: list[EpochStats]
    assignments: np.ndarray  # the last epoch's pseudo-labels (first head)
    resumed_from: int  # epochs already done when this call started


# ---------------------------------------------------------------------------------------------
# Learning rate


def steps_per_epoch(params: Params, n_images: int) -> int:
    return math.ceil(n_images / int(params.train.batch_size))


def step_lr(params: Params, step: int, per_epoch: int) -> float:
    """The trunk's rate at a 0-based step: linear warm-up, then constant or cosine to zero."""
    t = params.train
    warm = t.warmup_epochs * per_epoch
    if step < warm:
        return t.lr * (step + 1) / warm
    if t.schedule == "constant":
        return t.lr
    total = int(t.epochs) * per_epoch
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return t.lr * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# State that survives a restart


@dataclass
class LoopState:
    """Everything an epoch changes, so a resumed run continues exactly where it stopped."""

    epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    assignments: np.ndarray | None = None  # the last clustering's labels (first head)
    memory: torch.Tensor | None = None  # v2: (GLOBAL_CROPS, n, d) unit embeddings of the last pass
    lr_scale: float = 1.0  # lowered by the cluster-health guard after a collapse


def _save_checkpoint(
    path: Path, model, optimizer, generator, state: LoopState, params, ranks
) -> None:
    """Rank 0 writes it; every rank's random state goes in, so each resumes its own stream."""
    rng_states = dist.all_gather_objects(torch.get_rng_state(), ranks)
    if not ranks.main:
        return
    ckpt.save(
        {
            "model": model.state_dict(),
            "heads": model.head_sizes,
            "optimizer": optimizer.state_dict(),
            "epoch": state.epoch,
            "generator": generator.get_state(),
            "torch_rng": rng_states,
            "assignments": torch.from_numpy(state.assignments),
            "memory": state.memory,
            "lr_scale": state.lr_scale,
            "history": [asdict(h) for h in state.history],
            "params": params.to_dict(),
            "fingerprint": ckpt.params_fingerprint(params),
        },
        path,
    )


# ---------------------------------------------------------------------------------------------
# The two steps of an epoch


def head_sizes(params: Params) -> list[int]:
    """k per head: v1 has one head of k; v2 one head per `cluster.heads` entry (entry x k)."""
    k = int(params.cluster.k)
    if params.model.method == "deepcluster":
        return [k]
    return [max(2, round(k * scale)) for scale in params.cluster.heads]


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


def cluster_epoch(
    model: DeepClusterNet,
    source: ImageSource,
    params: Params,
    state: LoopState,
    seed: int,
    progress: bool,
    ranks: dist.Ranks = dist.ONE,
) -> list[Clustering]:
    """This epoch's pseudo-labels, one clustering per head; v2 also sets the prototypes.

    Rank 0 clusters; every rank receives the same clusterings."""
    c = params.cluster
    use_gpu = source.device.type == "cuda"
    if not model.v2:
        feats = all_features(model, source, params, progress, ranks)
        clusterings = None
        if ranks.main:
            clusterings = [
                cluster_features(
                    feats, int(c.k), int(c.pca_dim), c.kmeans_iters, c.kmeans_redo, seed, use_gpu
                )
            ]
        clusterings = dist.broadcast(clusterings, ranks)
        model.reset_heads([clusterings[0].k])
        return clusterings
    if state.memory is None:  # first epoch: the untrained network's view of every image
        feats = all_features(model, source, params, progress, ranks)
        state.memory = torch.from_numpy(feats).expand(GLOBAL_CROPS, -1, -1).clone()
    clusterings = None
    if ranks.main:
        clusterings = [
            cluster_features(
                state.memory[h % GLOBAL_CROPS].numpy(),
                k,
                None,
                c.kmeans_iters,
                c.kmeans_redo,
                seed + 7919 * h,  # a different start for each head
                use_gpu,
                spherical=True,
            )
            for h, k in enumerate(head_sizes(params))
        ]
    clusterings = dist.broadcast(clusterings, ranks)
    model.set_prototypes([torch.from_numpy(cl.centroids) for cl in clusterings])
    return clusterings


class TrainingStep(nn.Module):
    """The forward pass of one training step in one call, as DistributedDataParallel needs it:
    v1 the head's logits; v2 the global crops' embeddings and every view's scores per head."""

    def __init__(self, net: DeepClusterNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None):
        if not self.net.v2:
            return None, [self.net(global_crops)]
        z = self.net.embed(global_crops)
        views = [z] if local_crops is None else [z, self.net.embed(local_crops)]
        return z, [torch.cat(per_head) for per_head in zip(*map(self.net.logits, views))]


class EpochTrainer:
    """One pass of SGD over pseudo-labels. Every rank draws the same order and crops for the
    whole batch and trains on its share; with several ranks, DistributedDataParallel averages
    the gradients, so the optimisation is the one-process run's."""

    def __init__(self, model, optimizer, source, params, generator, photometric, ranks) -> None:
        self.model, self.optimizer, self.source = model, optimizer, source
        self.params, self.generator, self.photometric = params, generator, photometric
        self.ranks = ranks
        self.per_epoch = steps_per_epoch(params, len(source))

    def _forward(self) -> nn.Module:
        """The step's module, rebuilt each epoch: the heads change with every clustering."""
        step = TrainingStep(self.model)
        if not self.ranks.active:
            return step
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.source.device.index] if self.source.device.type == "cuda" else None
        return DistributedDataParallel(step, device_ids=ids)

    def run(self, clusterings: list[Clustering], state: LoopState, progress: bool) -> tuple:
        """Returns (mean loss over all ranks, last learning rate)."""
        t, model, ranks = self.params.train, self.model, self.ranks
        if model.v2:
            order = torch.randperm(len(self.source), generator=self.generator).numpy()
            labels = [torch.from_numpy(cl.assignments) for cl in clusterings]
        else:
            order, first = uniform_over_clusters(
                clusterings[0].assignments, len(self.source), self.generator
            )
            labels = [torch.from_numpy(first)]
        forward = self._forward()
        head_opt = None
        if not model.v2:  # v1: a new linear head every epoch, trained with its own optimiser
            head_opt = sgd(model.heads.parameters(), self.source.device, t.lr, 0.0, t.weight_decay)
        touched = torch.zeros(len(self.source), dtype=torch.bool)
        model.train()
        total, seen, lr = 0.0, 0, 0.0
        starts = range(0, len(order), int(t.batch_size))
        shown = bar(starts, desc="train", enabled=progress and ranks.main)
        for i, start in enumerate(shown):
            batch = order[start : start + int(t.batch_size)]
            if len(batch) < 2 * ranks.world:  # batch norm needs two samples on every rank
                continue
            step = state.epoch * self.per_epoch + i
            lr = step_lr(self.params, step, self.per_epoch) * state.lr_scale
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if head_opt is not None:
                for group in head_opt.param_groups:
                    group["lr"] = self.head_lr(lr, state)
            # v1 labels follow the draw order; v2 labels are looked up by image index
            targets = (
                [lab[start : start + len(batch)] for lab in labels]
                if not model.v2
                else [lab[torch.from_numpy(batch)] for lab in labels]
            )
            mine = slice(ranks.rank, None, ranks.world)
            loss = self._step(batch, mine, [y[mine] for y in targets], state, head_opt, forward)
            touched[torch.from_numpy(batch[mine])] = True
            total += loss * len(batch[mine])
            seen += len(batch[mine])
            shown.set_postfix(loss=f"{total / seen:.3f}")
        if model.v2:
            state.memory = dist.merge_rows(state.memory, touched, ranks)
        total, seen = dist.sum_scalars([total, float(seen)], ranks)
        return total / max(seen, 1), lr

    def head_lr(self, trunk_lr: float, state: LoopState) -> float:
        """v1's head starts from nothing every epoch, so it keeps the base rate while the trunk's
        decays (following the trunk, it could not learn the last epochs' labels)."""
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
        t, a, model = self.params.train, self.params.augment, self.model
        device = self.source.device
        idx = batch[mine]
        x = self.source.floats(idx)
        targets = [y.to(device) for y in targets]
        side = x.shape[-1]
        with autocast(device, self.params.compute.amp):
            if model.v2:
                global_crops = self._crops(x, GLOBAL_CROPS, a.crop_scale, side, len(batch), mine)
                local_crops = None
                if a.local_crops:
                    small = max(8, round(side * a.local_size))
                    local_crops = self._crops(
                        x, a.local_crops, a.local_scale, small, len(batch), mine
                    )
                z, logits = forward(global_crops, local_crops)
                n_views = GLOBAL_CROPS + a.local_crops
                loss = sum(
                    F.cross_entropy(s.float() / t.temperature, y.repeat(n_views))
                    for s, y in zip(logits, targets, strict=True)
                ) / len(logits)
            else:
                _, (logits,) = forward(self._crops(x, 1, a.crop_scale, side, len(batch), mine))
                loss = F.cross_entropy(logits, targets[0])
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
                f"train.lr (now {t.lr}); the checkpoint of epoch {state.epoch} is kept"
            )
        if model.v2:  # the memory bank: this pass's view of each image, for the next clustering
            z = z.detach().float().view(GLOBAL_CROPS, len(idx), -1).cpu()
            state.memory[:, torch.from_numpy(idx)] = z
        return value


# ---------------------------------------------------------------------------------------------
# The loop


def data_statistics(images: np.ndarray, sample: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the images in [0, 1], from an even sample of the cache."""
    step = max(1, len(images) // sample)
    rows = np.asarray(images[::step], dtype=np.float32) / 255.0
    return torch.from_numpy(rows.mean(axis=(0, 2, 3))), torch.from_numpy(rows.std(axis=(0, 2, 3)))


def sgd(parameters, device: torch.device, lr: float, momentum: float, weight_decay: float):
    """SGD, fused where torch has the kernel: one pass over the weights instead of one per
    operation (AlexNet's 61M parameters: 20 ms a step against 280 ms on two CPU cores)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.SGD(
        parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused
    )


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


def check_resumable(path: Path, params: Params, world: int) -> dict:
    """The checkpoint at `path`, refused unless a run of `params` in `world` processes can
    continue it. The pipeline calls this before it opens an MLflow run for the training."""
    state = ckpt.load(path)
    if state["fingerprint"] != ckpt.params_fingerprint(params):
        raise UserError(
            f"{path} was trained with other parameters: resume it with those, or discard it "
            "with --fresh (Dagster: resume: false)"
        )
    if int(state["epoch"]) > int(params.train.epochs):
        raise UserError(
            f"{path} already holds {state['epoch']} epochs, more than train.epochs = "
            f"{params.train.epochs}: train longer, or from scratch with --fresh"
        )
    processes = len(state["torch_rng"])
    if processes != world:
        raise UserError(
            f"{path} was trained by {processes} processes: resume it with --nproc {processes}"
        )
    return state


def _resume(path: Path, params: Params, model, optimizer, generator, ranks) -> LoopState:
    state = check_resumable(path, params, ranks.world)
    model.reset_heads(state["heads"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"][ranks.rank])
    return LoopState(
        epoch=int(state["epoch"]),
        history=[EpochStats(**h) for h in state["history"]],
        assignments=state["assignments"].numpy(),
        memory=state["memory"],
        lr_scale=float(state["lr_scale"]),
    )


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
    set_threads(params.compute.threads)
    files.folder.mkdir(parents=True, exist_ok=True)
    model, optimizer, generator = _build(params, images, device, ranks)
    state = LoopState()
    if files.checkpoint.exists():
        state = _resume(files.checkpoint, params, model, optimizer, generator, ranks)
    start_epoch = state.epoch
    source = ImageSource(images, device)
    photometric = aug.photometric(params.augment, is_colour(images), images.shape[-1])
    trainer = EpochTrainer(model, optimizer, source, params, generator, photometric, ranks)
    last_epoch = t.epochs if stop_after is None else min(t.epochs, stop_after)
    show = progress and ranks.main
    with heap_reuse(device.type == "cpu"):  # CPU steps reuse freed blocks, not fault them in
        for epoch in range(start_epoch, last_epoch):
            stats = _epoch(epoch, model, source, params, state, trainer, labels, show, ranks)
            _save_checkpoint(files.checkpoint, model, optimizer, generator, state, params, ranks)
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
    epoch, model, source, params, state: LoopState, trainer, labels, show, ranks
) -> EpochStats:
    """One epoch: cluster (again from other seeds if the clusters collapsed), then train."""
    began, seed = time.perf_counter(), params.train.seed
    clusterings = cluster_epoch(model, source, params, state, seed + epoch, show, ranks)
    health = ClusterHealth.of(clusterings[0], state.assignments)
    action = guard.react(health, state)
    if action is not None:  # collapsed: cluster again from other seeds, train more gently
        reseed = seed + 104729 * (epoch + 1)
        clusterings = cluster_epoch(model, source, params, state, reseed, show, ranks)
        health = ClusterHealth.of(clusterings[0], state.assignments)
    loss, lr = trainer.run(clusterings, state, show)
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
