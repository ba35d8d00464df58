"""Training methods, one module per method: its heads, the clustering of an epoch, the sample
order and targets, and a pure loss. The epoch loop (`deepcluster.train`) sees a method only
through `Method`, so it holds no method of its own; `for_params` picks the one params ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..schedule import sgd

if TYPE_CHECKING:  # the model imports the DeeperCluster heads from this package
    from .. import distributed as dist
    from ..cluster import Clustering
    from ..config import Params
    from ..embed import ImageSource
    from ..models import DeepClusterNet
    from ..resume import LoopState


@dataclass
class Context:
    """What a method's clustering sees: the network, the images and how to embed them all."""

    model: DeepClusterNet
    source: ImageSource
    params: Params
    features: Callable[[], np.ndarray]  # (n, d) embeddings of every image, on every rank
    ranks: dist.Ranks
    progress: bool = False  # progress bars (the main rank of an interactive run)

    @property
    def use_gpu(self) -> bool:
        return self.source.device.type == "cuda"


@dataclass
class Plan:
    """An epoch's sample order (image ids, batches are consecutive slices of it) and the
    targets of a batch: `targets(start, batch)` -> one tensor per head, for the whole batch."""

    order: np.ndarray
    targets: Callable[[int, np.ndarray], list[torch.Tensor]]


@dataclass
class StepBatch:
    """One SGD step's share of this rank: its images and targets, and the crops drawn for the
    whole batch (every rank draws the same randoms and keeps its own rows, `mine`)."""

    images: torch.Tensor  # (b, C, H, W) floats in [0, 1], this rank's images
    indices: np.ndarray  # (b,) their ids
    targets: list[torch.Tensor]  # per head, (b,) on the device
    size: int  # images in the whole batch, all ranks together
    mine: slice  # this rank's rows of the whole batch
    crops: Callable[[int, tuple[float, float], int], torch.Tensor]  # (count, scale, side)
    generator: torch.Generator  # the run's stream, the same on every rank


class Method:
    """The interface the epoch loop calls, in this order per epoch: `reclusters`, then
    `cluster` (or `kept`), `plan`, `head_optimizer`, `step_module` (DDP wraps it), and per step
    `forward_loss`; `end_epoch` after the last step."""

    unused_parameters = False  # DDP: some parameters may get no gradient in a step

    def __init__(self, params: Params) -> None:
        self.params = params

    def head_sizes(self) -> list[int]:
        """The width of each head, as the model builds and the checkpoint stores them."""
        raise NotImplementedError

    def reclusters(self, epoch: int) -> bool:
        """Whether the 0-based `epoch` clusters again (else it keeps the last clustering)."""
        return True

    def kept(self, state: LoopState) -> list[Clustering]:
        """The last clustering again, rebuilt from the state (epochs that do not recluster)."""
        raise NotImplementedError

    def cluster(self, ctx: Context, state: LoopState, seed: int) -> list[Clustering]:
        """This epoch's clusterings, one per head group, the same on every rank; sets the heads."""
        raise NotImplementedError

    def plan(self, clusterings: list[Clustering], n: int, generator: torch.Generator) -> Plan:
        raise NotImplementedError

    def head_optimizer(self, model: DeepClusterNet, device: torch.device):
        """An optimiser of the heads at the base rate (heads that start from nothing each
        clustering), or None when the heads are not trained by SGD."""
        t = self.params.train
        return sgd(model.heads.parameters(), device, t.lr, 0.0, t.weight_decay)

    def step_module(self, net: DeepClusterNet) -> nn.Module:
        """The forward pass of one step as one module, as DistributedDataParallel needs it."""
        raise NotImplementedError

    def forward_loss(self, forward: nn.Module, batch: StepBatch, state: LoopState) -> torch.Tensor:
        """The step's loss (scalar) through `forward` (the `step_module`, maybe wrapped)."""
        raise NotImplementedError

    def end_epoch(self, state: LoopState, touched: torch.Tensor, ranks: dist.Ranks) -> None:
        """After the epoch's last step; `touched` (n,) bool: the images this rank trained on."""

    def figures(self, trained: Callable[[], DeepClusterNet], images: np.ndarray) -> dict[str, float]:
        """Figures of the trained network that only this method gives, for the report;
        `trained()` loads the network, called only by a method that has such figures."""
        return {}


def for_params(params: Params) -> Method:
    """The method `model.method` names."""
    from . import deepcluster, deepcluster_v2, deepercluster  # they import this module's types

    kinds = {
        "deepcluster": deepcluster.DeepCluster,
        "deepcluster-v2": deepcluster_v2.DeepClusterV2,
        "deepercluster": deepercluster.DeeperCluster,
    }
    return kinds[params.model.method](params)
