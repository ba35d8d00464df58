"""The DeepCluster loop: cluster the features, train on the clusters, repeat.

Each epoch: embed every image (eval mode, no augmentation) -> PCA-whiten + L2 -> k-means -> draw
images uniformly over clusters -> fresh linear head -> one epoch of SGD on the pseudo-labels with
augmentation done in batches on the device. The state is checkpointed atomically after every epoch so
that a killed run resumes where it stopped, with the same result as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import augment as aug
from .cluster import Clustering, cluster_features, nmi
from .config import Params, params_from_dict
from .device import autocast, memory_format, resolve_device
from .errors import UserError
from .io import atomic_path, write_json
from .models import DeepClusterNet, build_model, check_resolution
from .sampler import uniform_over_clusters

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
HISTORY = "history.json"


@dataclass
class EpochStats:
    epoch: int  # 1-based
    loss: float  # mean pseudo-label cross-entropy over the epoch
    kmeans_loss: float
    nmi_prev: float | None  # NMI between this epoch's and the previous epoch's assignments
    nmi_labels: float | None  # NMI against the folder labels, when there are any
    reseeded: int  # empty clusters re-seeded by splitting
    lr: float
    largest_cluster_share: float
    seconds: float


@dataclass
class TrainResult:
    model: DeepClusterNet
    history: list[EpochStats]
    assignments: np.ndarray  # the last epoch's pseudo-labels
    resumed_from: int  # epochs already done when this call started


class ImageSource:
    """Batches of the decoded uint8 cache on the training device.

    When the whole cache fits comfortably in GPU memory it is copied there once, so an epoch moves
    no image data at all; otherwise batches are gathered from the memory map.
    """

    def __init__(self, images: np.ndarray, device: torch.device) -> None:
        self.images = images
        self.device = device
        self.resident: torch.Tensor | None = None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.nbytes < 0.25 * free:
                self.resident = torch.from_numpy(np.ascontiguousarray(images)).to(device)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        if self.resident is not None:
            return self.resident[torch.from_numpy(indices).to(self.device)]
        order = np.argsort(indices)  # read the memory map in file order, then restore draw order
        rows = np.empty((len(indices), *self.images.shape[1:]), dtype=np.uint8)
        rows[order] = self.images[indices[order]]
        tensor = torch.from_numpy(rows)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)


def eval_batch_size(params: Params) -> int:
    """Inference needs no small batches for gradient noise: use at least 256 images a batch."""
    return max(params.train.batch_size, 256)


def _prepare(batch_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return aug.normalize(batch_u8).contiguous(memory_format=memory_format(device))


@torch.no_grad()
def compute_features(
    model: DeepClusterNet,
    source: ImageSource,
    batch_size: int,
    amp: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings (n, embed_dim) of every image in order, eval mode, no augmentation."""
    model.eval()
    device = source.device
    out = np.empty((len(source), model.params.embed_dim), dtype=np.float32)
    starts = range(0, len(source), batch_size)
    for start in tqdm(starts, desc="features", disable=not progress, leave=False):
        idx = np.arange(start, min(start + batch_size, len(source)))
        with autocast(device, amp):
            emb = model.embed(_prepare(source.batch(idx), device))
        out[start : start + len(idx)] = emb.float().cpu().numpy()
    return out


def train_one_epoch(
    model: DeepClusterNet,
    optimizer: torch.optim.Optimizer,
    source: ImageSource,
    clustering: Clustering,
    params: Params,
    generator: torch.Generator,
    lr: float,
    progress: bool = True,
) -> float:
    """One pass of SGD on pseudo-labels drawn uniformly over clusters; returns the mean loss."""
    t, device = params.train, source.device
    model.reset_head(clustering.k)
    for group in optimizer.param_groups:
        group["lr"] = lr
    head_opt = torch.optim.SGD(model.head.parameters(), lr=lr, weight_decay=t.weight_decay)
    indices, labels = uniform_over_clusters(clustering.assignments, len(source), generator)
    model.train()
    total, seen = 0.0, 0
    starts = range(0, len(indices), t.batch_size)
    bar = tqdm(starts, desc="train", disable=not progress, leave=False)
    for start in bar:
        idx = indices[start : start + t.batch_size]
        if len(idx) < 2:  # batch norm needs two samples
            continue
        theta = aug.crop_flip_params(len(idx), t.crop_scale, t.hflip, generator)
        x = aug.augment(_prepare(source.batch(idx), device), theta)
        y = torch.from_numpy(labels[start : start + len(idx)]).to(device)
        with autocast(device, t.amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        head_opt.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return total / max(seen, 1)


def epoch_lr(params: Params, epoch: int) -> float:
    """Learning rate of a 0-based epoch: constant as in the paper, or cosine-decayed per epoch."""
    t = params.train
    if t.schedule == "constant":
        return t.lr
    return t.lr * 0.5 * (1 + math.cos(math.pi * epoch / t.epochs))


def params_fingerprint(params: Params) -> str:
    """Hash of everything that shapes a training run.

    With a constant learning rate the length is left out, so a finished run can be extended; a
    cosine schedule depends on the length, so there it is part of the fingerprint.
    """
    d = params.to_dict()
    if params.train.schedule == "constant":
        d["train"] = {k: v for k, v in d["train"].items() if k != "epochs"}
    d["eval"] = {}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, model, optimizer, epoch, generator, assignments, history, params):
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "assignments": torch.from_numpy(assignments),
        "history": [asdict(h) for h in history],
        "params": params.to_dict(),
        "fingerprint": params_fingerprint(params),
    }
    _save(state, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def export_model(model: DeepClusterNet, params: Params, path: Path) -> Path:
    """Final weights plus the parameters needed to rebuild the network (loads with weights_only)."""
    state = {"model": model.state_dict(), "params": params.to_dict(), "k": model.head.out_features}
    return _save(state, path)


def _save(state: dict, path: Path) -> Path:
    """torch.save, atomically. Through a file object: given a path, torch names the archive inside
    after the (random) temporary file, so equal states would give different bytes, and DVC would
    see a changed model.pt after every identical re-run."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return path


def saved_params(path: Path) -> Params:
    """The parameters a model exported by `export_model` was trained with."""
    return params_from_dict(torch.load(path, map_location="cpu", weights_only=True)["params"])


def load_model(path: Path, device: str | torch.device = "cpu") -> DeepClusterNet:
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = params_from_dict(state["params"])
    model = build_model(params.model, state["k"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def train(
    params: Params,
    images: np.ndarray,
    out_dir: Path,
    labels: np.ndarray | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Run DeepCluster for `params.train.epochs` epochs, resuming from `out_dir/checkpoint.pt`.

    `stop_after` ends the call after that many epochs in total (a scheduled stop; the checkpoint is
    there to resume). `on_epoch` receives each epoch's statistics (MLflow, Dagster logs).
    """
    t, c = params.train, params.cluster
    check_resolution(params.model.arch, images.shape[-1])
    device = resolve_device(t.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    model = build_model(params.model, c.k).to(device, memory_format=memory_format(device))
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    optimizer = torch.optim.SGD(body, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(t.seed)
    history: list[EpochStats] = []
    previous: np.ndarray | None = None
    start_epoch = 0

    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state["fingerprint"] != params_fingerprint(params):
            raise UserError(
                f"{ckpt_path} was trained with other parameters; delete it or use another output folder"
            )
        if int(state["epoch"]) > t.epochs:
            raise UserError(
                f"{ckpt_path} already holds {state['epoch']} epochs, more than train.epochs = "
                f"{t.epochs}; delete it or use another output folder"
            )
        model.reset_head(state["model"]["head.weight"].shape[0])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        previous = state["assignments"].numpy()
        history = [EpochStats(**h) for h in state["history"]]
        start_epoch = int(state["epoch"])

    source = ImageSource(images, device)
    last_epoch = t.epochs if stop_after is None else min(t.epochs, stop_after)
    for epoch in range(start_epoch, last_epoch):
        began = time.perf_counter()
        feats = compute_features(model, source, eval_batch_size(params), t.amp, progress)
        clustering = cluster_features(
            feats,
            c.k,
            c.pca_dim,
            c.kmeans_iters,
            c.kmeans_redo,
            seed=t.seed + epoch,
            use_gpu=device.type == "cuda",
        )
        lr = epoch_lr(params, epoch)
        loss = train_one_epoch(
            model, optimizer, source, clustering, params, generator, lr, progress
        )
        ids = clustering.assignments
        stats = EpochStats(
            epoch=epoch + 1,
            loss=loss,
            kmeans_loss=clustering.loss,
            nmi_prev=None if previous is None else nmi(previous, ids),
            nmi_labels=None if labels is None else nmi(labels, ids),
            reseeded=clustering.reseeded,
            lr=lr,
            largest_cluster_share=float(clustering.sizes().max() / len(ids)),
            seconds=time.perf_counter() - began,
        )
        history.append(stats)
        previous = ids
        _save_checkpoint(ckpt_path, model, optimizer, epoch + 1, generator, ids, history, params)
        write_json(out_dir / HISTORY, [asdict(h) for h in history])
        if on_epoch is not None:
            on_epoch(stats)
        if progress:
            tqdm.write(_describe(stats, t.epochs))

    if last_epoch == t.epochs:
        export_model(model, params, out_dir / MODEL)
    assert previous is not None, "no epoch ran and no checkpoint was found"
    return TrainResult(model.eval(), history, previous, start_epoch)


def _describe(s: EpochStats, epochs: int) -> str:
    parts = [f"epoch {s.epoch}/{epochs}", f"loss {s.loss:.3f}", f"kmeans {s.kmeans_loss:.2f}"]
    if s.nmi_prev is not None:
        parts.append(f"NMI(t-1,t) {s.nmi_prev:.3f}")
    if s.nmi_labels is not None:
        parts.append(f"NMI(labels) {s.nmi_labels:.3f}")
    parts += [f"largest {s.largest_cluster_share:.1%}", f"{s.seconds:.1f}s"]
    return "  ".join(parts)
