"""Embeddings of images under a network: the features pass training, evaluation, the features
step and serving share. No training code here, so serving loads only what it needs."""

from __future__ import annotations

import numpy as np
import torch

from . import augment as aug
from .config import Params
from .device import autocast, memory_format
from .models import DeepClusterNet
from .progress import bar


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

    def floats(self, indices: np.ndarray) -> torch.Tensor:
        """The batch as float images in [0, 1], in the device's fast memory layout."""
        x = aug.to_float(self.batch(indices))
        return x.contiguous(memory_format=memory_format(self.device))


def eval_batch_size(params: Params) -> int:
    """Inference needs no small batches for gradient noise: use at least 256 images a batch."""
    return max(int(params.train.batch_size), 256)


@torch.no_grad()
def compute_features(
    model: DeepClusterNet,
    source: ImageSource,
    batch_size: int,
    amp: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings (n, embed_dim) of every image in order, eval mode, no augmentation."""
    return _pass(model, source, batch_size, amp, progress, backbone=False)[0]


@torch.no_grad()
def compute_views(
    model: DeepClusterNet, source: ImageSource, batch_size: int, amp: bool, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, backbone features) in one pass: what k-means sees, and the conv trunk's
    output that the kNN and linear probes read (as is usual for self-supervised features)."""
    return _pass(model, source, batch_size, amp, progress, backbone=True)


def _pass(model, source, batch_size, amp, progress, backbone) -> tuple[np.ndarray, ...]:
    model.eval()
    device = source.device
    embeds, trunks = [], []
    starts = range(0, len(source), batch_size)
    for start in bar(starts, desc="features", enabled=progress):
        idx = np.arange(start, min(start + batch_size, len(source)))
        with autocast(device, amp):
            trunk = model.trunk_features(source.floats(idx))
            embeds.append(model.embed_trunk(trunk).float().cpu().numpy())
        if backbone:
            trunks.append(trunk.float().cpu().numpy())
    return (np.concatenate(embeds), np.concatenate(trunks)) if backbone else (np.concatenate(embeds),)
