"""DeepCluster (Caron et al., ECCV 2018): k-means pseudo-labels for a fresh linear classifier.

Each epoch embeds every image (eval mode, no augmentation), PCA-whitens, L2-normalises and runs
k-means; images are drawn uniformly over the clusters and one new linear head (on the ReLU of the
embedding) learns their cluster ids with the trunk. The head is new every epoch, so it keeps the
base learning rate while the trunk's decays: a head that starts from zero with a decayed rate
cannot learn the new labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..cluster import Clustering, cluster_features
from ..models import DeepClusterNet
from ..resume import LoopState
from ..sampler import uniform_over_clusters
from . import Context, Method, Plan, StepBatch


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, k) against cluster ids (B,) int64: a scalar."""
    return F.cross_entropy(logits, targets)


class Step(nn.Module):
    """One step's forward: crops (B, C, H, W) -> the head's logits (B, k)."""

    def __init__(self, net: DeepClusterNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)


class DeepCluster(Method):
    def head_sizes(self) -> list[int]:
        return [int(self.params.cluster.k)]

    def cluster(self, ctx: Context, state: LoopState, seed: int) -> list[Clustering]:
        """Rank 0 clusters every rank's features; every rank gets the clustering and a new head."""
        c = self.params.cluster
        feats = ctx.features()
        clusterings = None
        if ctx.ranks.main:
            clusterings = [
                cluster_features(
                    feats, int(c.k), int(c.pca_dim), c.kmeans_iters, c.kmeans_redo, seed, ctx.use_gpu
                )
            ]
        clusterings = dist.broadcast(clusterings, ctx.ranks)
        ctx.model.reset_heads([clusterings[0].k])
        return clusterings

    def plan(self, clusterings: list[Clustering], n: int, generator: torch.Generator) -> Plan:
        """n draws uniform over the clusters; the labels follow the draw order."""
        order, labels = uniform_over_clusters(clusterings[0].assignments, n, generator)
        first = torch.from_numpy(labels)
        return Plan(order, lambda start, batch: [first[start : start + len(batch)]])

    def step_module(self, net: DeepClusterNet) -> nn.Module:
        return Step(net)

    def forward_loss(self, forward: nn.Module, batch: StepBatch, state: LoopState) -> torch.Tensor:
        side = batch.images.shape[-1]
        logits = forward(batch.crops(1, self.params.augment.crop_scale, side))
        return loss(logits, batch.targets[0])
