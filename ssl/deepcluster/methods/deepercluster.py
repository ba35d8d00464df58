"""DeeperCluster (Caron et al., ICCV 2019): predict rotations and clusters in one hierarchical loss.

The network classifies each image into a super-class, the pair (rotation, super-cluster), and,
within its super-class, into the sub-class, its cluster within the super-cluster:

- R = 4 rotations (0, 90, 180, 270 degrees) with rotation, else R = 1; S super-clusters and k
  clusters from `hkmeans.hierarchical_kmeans`, k/S per super-cluster.
- super-class target = super_cluster * R + rotation, in [0, R*S). This is the reference's order:
  its process groups are numbered so that training group super_cluster * 4 + rotation trains
  super-cluster `super_cluster` at angle 90 * rotation (src/utils.py, init_distributed_mode).
- sub-class target = the cluster within the super-cluster, in [0, k/S), the same for all four
  rotations of an image: the reference's dataset returns the second-level assignment whatever
  the angle (src/clustering.py, src/data/YFCC100M.py).
- heads: one linear super-class head (d -> R*S) and one linear sub-class head (d -> k/S) per
  super-class, so R*S sub-heads, not S: in the reference each training group, i.e. each
  (super-cluster, rotation) pair, owns its sub-class layer (main.py, build_prediction_layer with
  the group's process group; one `<group>-pred_layer.pth.tar` per group).
- loss = mean over the batch of the super-class cross-entropy + mean over the batch of each
  image's sub-class cross-entropy under its own super-class's head (the paper's loss; the
  reference adds the two cross-entropies of each process's batch, src/trainer.py).

The special cases reduce exactly: S = 1 without rotation is DeepCluster (one super-class whose
term is zero; one k-way head), k = S = 1 with rotation is RotNet (four super-classes, the
rotations; sub-heads of one class whose term is zero). The reference's README names the same two
settings. Rotations are drawn per image here; the reference fixes one angle per process, which
draws the same distribution over an epoch.

The sub-heads' step size: the reference averages each sub-head's loss over its own group's
batch, while the trunk's gradient is the mean over all processes, i.e. over all images. Here one
batch holds every super-class and the loss is the mean over the batch: the trunk's gradient is the
reference's, and a sub-head's is its group's mean times its share of the batch, about 1/(R*S) of
the reference's. That is kept, on purpose: scaling the sub-heads' rate by R*S (the reference's
expected step) means steps of R*S times the base rate on heads that each see about B/(R*S)
images per step, and on 3,000 digits (R*S = 12) it lost kNN accuracy: gaps over the baselines of
0.007 and 0.018 (seeds 0, 1) against 0.031 and 0.019 at the heads' base rate. All heads train at
v1's head rate, with v1's head optimiser.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..cluster import Clustering, identity_whitening
from ..config import Params
from ..device import autocast, resolve_device
from ..embed import ImageSource
from ..hkmeans import hierarchical_kmeans
from ..models import DeepClusterNet
from ..resume import LoopState
from ..sampler import uniform_over_clusters
from . import Context, Method, Plan, StepBatch

ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotations_of(rotation: bool) -> int:
    """R: how many rotation classes the super-classes cross with the super-clusters."""
    return ROTATIONS if rotation else 1


def draw_rotations(batch: int, generator: torch.Generator, rotation: bool = True) -> torch.Tensor:
    """(batch,) int64 rotation index per image, uniform in 0..3; all 0 without rotation."""
    if not rotation:
        return torch.zeros(batch, dtype=torch.long)
    return torch.randint(ROTATIONS, (batch,), generator=generator)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) each turned counter-clockwise by 90 * r[i] degrees (the reference's
    `rotate_img` direction), r (B,) int64 in 0..3; returns (B, C, H, W). A quarter turn swaps
    height and width, so images with r odd must be square."""
    r = r.to(x.device).long()
    if r.shape != (x.shape[0],):
        raise ValueError(f"one rotation per image: got {tuple(r.shape)} for {x.shape[0]} images")
    if x.shape[-1] != x.shape[-2] and bool((r % 2 == 1).any()):
        raise ValueError(f"a quarter turn needs square images, got {x.shape[-2]}x{x.shape[-1]}")
    out = x.clone()
    for q in range(1, ROTATIONS):  # one rot90 per angle present, not one per image
        idx = torch.nonzero(r == q).squeeze(1)
        if idx.numel():
            out[idx] = torch.rot90(x[idx], q, dims=(-2, -1))
    return out


def targets(
    super_ids: torch.Tensor, sub_ids: torch.Tensor, rotations: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(super-class, sub-class) targets, each (B,) int64.

    super_ids (B,) the image's super-cluster in [0, S); sub_ids (B,) its cluster within it, in
    [0, k/S); rotations (B,) in 0..3, or None without rotation (R = 1). Super-class =
    super_cluster * R + rotation in [0, R*S); sub-class = sub_ids, whatever the rotation.
    """
    super_ids, sub_ids = super_ids.long(), sub_ids.long()
    if rotations is None:
        return super_ids, sub_ids
    return super_ids * ROTATIONS + rotations.to(super_ids.device).long(), sub_ids


def head_sizes(k: int, super_clusters: int, rotation: bool) -> list[int]:
    """The model's heads in order: the super-class head (R*S), then R*S sub-class heads (k/S)."""
    classes = rotations_of(rotation) * super_clusters
    return [classes] + [k // super_clusters] * classes


def sub_logits(sub_heads: nn.ModuleList, z: torch.Tensor, super_targets: torch.Tensor) -> torch.Tensor:
    """(B, d) and each image's true super-class (B,) -> (B, k/S), row i from sub-head
    super_targets[i]. The batch is sorted by super-class and each head runs once on its
    contiguous group (one matrix product per head present, none per image)."""
    order = torch.argsort(super_targets, stable=True)
    present, counts = torch.unique_consecutive(super_targets[order], return_counts=True)
    groups = torch.split(z[order], counts.tolist())
    parts = [sub_heads[int(h)](g) for h, g in zip(present.tolist(), groups, strict=True)]
    if not parts:  # an empty batch
        return z.new_zeros(0, sub_heads[0].out_features)
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=order.device)
    return torch.cat(parts)[back]  # rows back in the batch's order


@torch.no_grad()
def rotation_accuracy(
    net: DeepClusterNet, source: ImageSource, amp: bool, limit: int = 2048, seed: int = 0
) -> float:
    """The share of (image, angle) pairs whose quarter turn the super-class head names: up to
    `limit` images (a fixed sample), each shown whole at all four angles, where training showed
    one random crop at one random angle. The head's probabilities are summed over the
    super-clusters to give the angle's. Chance is 0.25."""
    net.eval()
    ids = np.sort(np.random.default_rng(seed).permutation(len(source))[:limit])
    correct = 0
    for start in range(0, len(ids), 256):
        x = source.floats(ids[start : start + 256])
        for q in range(ROTATIONS):
            turned = rotate(x, torch.full((len(x),), q, dtype=torch.long))
            with autocast(source.device, amp):
                logits = net.heads[0](F.relu(net.embed(turned))).float()
            angles = logits.softmax(1).view(len(x), -1, ROTATIONS).sum(1)  # (B, S, R) -> (B, R)
            correct += int((angles.argmax(1) == q).sum())
    return correct / (len(ids) * ROTATIONS)


class HierarchicalHeads(nn.Module):
    """The super-class head (d -> R*S) and one sub-class head (d -> k/S) per super-class, held
    as one list in `head_sizes` order (the model's `heads`, so checkpoints and `load_model` see
    plain linear heads).

    Inputs are the features a v1 head sees (ReLU of the embedding, as in the reference). Heads
    start as the project's v1 head does: weights N(0, 0.01), biases zero.
    """

    def __init__(self, dim: int, k: int, super_clusters: int, rotation: bool) -> None:
        super().__init__()
        if super_clusters < 1 or k % super_clusters:
            raise ValueError(f"k = {k} must be a positive multiple of S = {super_clusters}")
        sizes = head_sizes(k, super_clusters, rotation)
        self.heads = nn.ModuleList(_linear(dim, classes) for classes in sizes)

    @property
    def super_head(self) -> nn.Linear:
        return self.heads[0]

    @property
    def sub_heads(self) -> nn.ModuleList:
        return self.heads[1:]

    @property
    def super_classes(self) -> int:
        """R*S."""
        return self.super_head.out_features

    @property
    def sub_classes(self) -> int:
        """k/S: the width of every sub-class head."""
        return self.sub_heads[0].out_features

    def super_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, R*S)."""
        return self.super_head(z)

    def sub_logits(self, z: torch.Tensor, super_targets: torch.Tensor) -> torch.Tensor:
        """(B, d), (B,) -> (B, k/S): see the module's `sub_logits`."""
        return sub_logits(self.sub_heads, z, super_targets)

    def forward(
        self, z: torch.Tensor, super_targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d), (B,) -> super-class logits (B, R*S) and own-head sub-class logits (B, k/S)."""
        return self.super_logits(z), self.sub_logits(z, super_targets)


def _linear(dim: int, classes: int) -> nn.Linear:
    head = nn.Linear(dim, classes)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    return head


def loss(
    super_logits: torch.Tensor,
    sub_logits: torch.Tensor,
    super_targets: torch.Tensor,
    sub_targets: torch.Tensor,
) -> torch.Tensor:
    """The hierarchical loss, a scalar: mean cross-entropy of super_logits (B, R*S) against
    super_targets (B,), plus mean cross-entropy of sub_logits (B, k/S), each row from the head of
    its true super-class (`HierarchicalHeads.sub_logits`), against sub_targets (B,).

    A level with a single class contributes exactly zero (no term, no gradient), so S = 1
    without rotation is the plain k-way cross-entropy and k = 1 with rotation the plain
    rotation cross-entropy, bit for bit.
    """
    total = super_logits.new_zeros(())
    if super_logits.shape[1] > 1:
        total = F.cross_entropy(super_logits, super_targets)
    if sub_logits.shape[1] > 1:
        sub = F.cross_entropy(sub_logits, sub_targets)
        total = sub if super_logits.shape[1] == 1 else total + sub
    return total


class Step(nn.Module):
    """One step's forward: rotated crops (B, C, H, W) and their super-class targets (B,) ->
    super-class logits (B, R*S) and own-head sub-class logits (B, k/S)."""

    def __init__(self, net: DeepClusterNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor, super_targets: torch.Tensor):
        h = F.relu(self.net.embed(crops))
        heads = self.net.heads
        return heads[0](h), sub_logits(heads[1:], h, super_targets)


class DeeperCluster(Method):
    """The loop's interface: hierarchical k-means every `cluster.reassign_every` epochs (fresh
    heads then, kept in between), images drawn uniformly over the k clusters, each turned by a
    random quarter turn, and the hierarchical loss."""

    unused_parameters = True  # the sub-heads of super-classes absent from a step get no gradient

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        c = params.cluster
        self.k, self.super_clusters = int(c.k), int(c.super_clusters)
        self.per_super = self.k // self.super_clusters

    def head_sizes(self) -> list[int]:
        return head_sizes(self.k, self.super_clusters, self.params.cluster.rotation)

    def reclusters(self, epoch: int) -> bool:
        return epoch % int(self.params.cluster.reassign_every) == 0

    def kept(self, state: LoopState) -> list[Clustering]:
        """The last clustering's labels (the checkpoint holds them) and its figures."""
        last = state.history[-1]
        n = len(state.assignments)
        return [
            Clustering(
                assignments=state.assignments,
                distances=np.zeros(n, dtype=np.float32),
                centroids=np.zeros((self.k, 1), dtype=np.float32),
                whitening=identity_whitening(1),
                loss=last.kmeans_loss,
                reseeded=0,
                kmeans_largest_share=last.largest_cluster_share,
            )
        ]

    def cluster(self, ctx: Context, state: LoopState, seed: int) -> list[Clustering]:
        """Hierarchical k-means of every image's embedding (level 2 spread over the ranks);
        new heads, since the cluster ids change meaning."""
        c = self.params.cluster
        clustering = hierarchical_kmeans(
            ctx.features(), self.k, self.super_clusters, int(c.pca_dim), c.kmeans_iters,
            c.kmeans_redo, seed, ctx.use_gpu, ranks=ctx.ranks,
        )  # fmt: skip
        ctx.model.reset_heads(self.head_sizes())
        return [clustering]

    def plan(self, clusterings: list[Clustering], n: int, generator: torch.Generator) -> Plan:
        """n draws uniform over the k clusters; (super-cluster, sub-cluster) follow the draws."""
        order, labels = uniform_over_clusters(clusterings[0].assignments, n, generator)
        ids = torch.from_numpy(labels)
        supers, subs = ids // self.per_super, ids % self.per_super
        return Plan(
            order, lambda start, batch: [y[start : start + len(batch)] for y in (supers, subs)]
        )

    def step_module(self, net: DeepClusterNet) -> nn.Module:
        return Step(net)

    def figures(self, trained, images: np.ndarray) -> dict[str, float]:
        """How well the network tells the rotations apart (`rotation_accuracy`), with rotation."""
        if not self.params.cluster.rotation:
            return {}
        c = self.params.compute
        source = ImageSource(images, resolve_device(c.device))
        return {"rotation_accuracy": rotation_accuracy(trained().to(source.device), source, c.amp)}

    def forward_loss(self, forward: nn.Module, batch: StepBatch, state: LoopState) -> torch.Tensor:
        rotation = self.params.cluster.rotation
        r = draw_rotations(batch.size, batch.generator, rotation)[batch.mine]
        side = batch.images.shape[-1]
        crops = rotate(batch.crops(1, self.params.augment.crop_scale, side), r)
        super_t, sub_t = targets(*batch.targets, r if rotation else None)
        super_t, sub_t = super_t.to(crops.device), sub_t.to(crops.device)
        return loss(*forward(crops, super_t), super_t, sub_t)
