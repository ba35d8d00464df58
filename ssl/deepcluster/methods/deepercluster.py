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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class HierarchicalHeads(nn.Module):
    """The super-class head (d -> R*S) and one sub-class head (d -> k/S) per super-class.

    Inputs are the features a v1 head sees (ReLU of the embedding, as in the reference). Heads
    start as the project's v1 head does: weights N(0, 0.01), biases zero.
    """

    def __init__(self, dim: int, k: int, super_clusters: int, rotation: bool) -> None:
        super().__init__()
        if super_clusters < 1 or k % super_clusters:
            raise ValueError(f"k = {k} must be a positive multiple of S = {super_clusters}")
        self.super_head = _linear(dim, rotations_of(rotation) * super_clusters)
        self.sub_heads = nn.ModuleList(
            _linear(dim, k // super_clusters) for _ in range(self.super_classes)
        )

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
        """(B, d) and each image's true super-class (B,) -> (B, k/S), row i from the head of
        super_targets[i]. The batch is sorted by super-class and each head runs once on its
        contiguous group (one matrix product per head present, none per image)."""
        order = torch.argsort(super_targets, stable=True)
        present, counts = torch.unique_consecutive(super_targets[order], return_counts=True)
        groups = torch.split(z[order], counts.tolist())
        parts = [self.sub_heads[int(h)](g) for h, g in zip(present.tolist(), groups, strict=True)]
        if not parts:  # an empty batch
            return z.new_zeros(0, self.sub_classes)
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order), device=order.device)
        return torch.cat(parts)[back]  # rows back in the batch's order

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
