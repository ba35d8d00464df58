"""DeepCluster-v2 (Caron et al., NeurIPS 2020): prototypes from spherical k-means, multi-crop.

Spherical k-means, one per prototype head, on the unit embeddings the previous epoch's training
pass stored (a memory bank, so no extra pass) -> prototypes := centroids -> every image once, as
two global and several local crops, each crop trained to predict its image's clusters with a
temperature softmax over prototype similarities. The prototypes are not trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..cluster import Clustering, cluster_features
from ..models import DeepClusterNet
from ..resume import LoopState
from . import Context, Method, Plan, StepBatch

GLOBAL_CROPS = 2  # crops per image that feed the memory bank (the reference uses two)


def loss(
    scores: list[torch.Tensor], targets: list[torch.Tensor], views: int, temperature: float
) -> torch.Tensor:
    """Mean over heads of the cross-entropy of each view's prototype similarities, a scalar.

    scores: per head h, (views * B, k_h) cosine similarities, view-major; targets: per head,
    (B,) int64 cluster ids, the same for every view of an image."""
    return sum(
        F.cross_entropy(s.float() / temperature, y.repeat(views))
        for s, y in zip(scores, targets, strict=True)
    ) / len(scores)


class Step(nn.Module):
    """One step's forward: the global crops' embeddings (GLOBAL_CROPS * B, d) and, per head,
    every view's scores (views * B, k_h)."""

    def __init__(self, net: DeepClusterNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None):
        z = self.net.embed(global_crops)
        views = [z] if local_crops is None else [z, self.net.embed(local_crops)]
        return z, [torch.cat(per_head) for per_head in zip(*map(self.net.logits, views))]


def head_sizes(k: int, scales: tuple[float, ...]) -> list[int]:
    """One head per `cluster.heads` entry, of entry x k clusters (at least 2)."""
    return [max(2, round(k * scale)) for scale in scales]


class DeepClusterV2(Method):
    def head_sizes(self) -> list[int]:
        return head_sizes(int(self.params.cluster.k), self.params.cluster.heads)

    def cluster(self, ctx: Context, state: LoopState, seed: int) -> list[Clustering]:
        """Rank 0 clusters the memory bank per head; every rank gets them as prototypes."""
        c = self.params.cluster
        if state.memory is None:  # first epoch: the untrained network's view of every image
            state.memory = torch.from_numpy(ctx.features()).expand(GLOBAL_CROPS, -1, -1).clone()
        clusterings = None
        if ctx.ranks.main:
            clusterings = [
                cluster_features(
                    state.memory[h % GLOBAL_CROPS].numpy(),
                    k,
                    None,
                    c.kmeans_iters,
                    c.kmeans_redo,
                    seed + 7919 * h,  # a different start for each head
                    ctx.use_gpu,
                    spherical=True,
                )
                for h, k in enumerate(self.head_sizes())
            ]
        clusterings = dist.broadcast(clusterings, ctx.ranks)
        ctx.model.set_prototypes([torch.from_numpy(cl.centroids) for cl in clusterings])
        return clusterings

    def head_optimizer(self, model: DeepClusterNet, device: torch.device) -> None:
        """None: the prototypes are set by each clustering, not trained by SGD."""
        return

    def plan(self, clusterings: list[Clustering], n: int, generator: torch.Generator) -> Plan:
        """Every image once, in a random order; labels looked up by image id."""
        order = torch.randperm(n, generator=generator).numpy()
        labels = [torch.from_numpy(cl.assignments) for cl in clusterings]
        return Plan(order, lambda start, batch: [lab[torch.from_numpy(batch)] for lab in labels])

    def step_module(self, net: DeepClusterNet) -> nn.Module:
        return Step(net)

    def forward_loss(self, forward: nn.Module, batch: StepBatch, state: LoopState) -> torch.Tensor:
        a = self.params.augment
        side = batch.images.shape[-1]
        global_crops = batch.crops(GLOBAL_CROPS, a.crop_scale, side)
        local_crops = None
        if a.local_crops:
            local_crops = batch.crops(a.local_crops, a.local_scale, max(8, round(side * a.local_size)))
        z, scores = forward(global_crops, local_crops)
        value = loss(scores, batch.targets, GLOBAL_CROPS + a.local_crops, self.params.train.temperature)
        # the memory bank: this pass's view of each image, for the next clustering
        z = z.detach().float().view(GLOBAL_CROPS, len(batch.indices), -1).cpu()
        state.memory[:, torch.from_numpy(batch.indices)] = z
        return value

    def end_epoch(self, state: LoopState, touched: torch.Tensor, ranks: dist.Ranks) -> None:
        state.memory = dist.merge_rows(state.memory, touched, ranks)

