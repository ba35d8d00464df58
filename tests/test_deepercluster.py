"""DeeperCluster's building blocks: rotations, hierarchical targets, heads and loss
(deepcluster.methods.deepercluster) and the hierarchical k-means (deepcluster.hkmeans); and a
short real training through the pipeline that resumes exactly."""

from __future__ import annotations

import shutil
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from deepcluster import checkpoint, cluster, hkmeans, pipeline
from deepcluster.cluster import Clustering, cluster_features, nmi
from deepcluster.distributed import Ranks
from deepcluster.embed import ImageSource
from deepcluster.errors import ParamError
from deepcluster.hkmeans import HierarchicalClustering, hierarchical_kmeans
from deepcluster.methods import deepercluster as dc
from deepcluster.paths import Artifacts

from .conftest import fast_params

# ---------------------------------------------------------------------------------------------
# Rotations


def test_rotate_turns_each_image_by_its_own_quarter_turns() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 5, 5, generator=g)
    r = dc.draw_rotations(12, g)
    out = dc.rotate(x, r)
    assert out.shape == x.shape
    for i in range(12):  # np.rot90 turns counter-clockwise, as the reference's rotate_img does
        expected = np.rot90(x[i].numpy(), int(r[i]), axes=(1, 2))
        np.testing.assert_array_equal(out[i].numpy(), expected)
    # the reference's 90 degrees on an H x W x C array: transpose, then upside down
    hwc = x[0].permute(1, 2, 0).numpy()
    turned = dc.rotate(x[:1], torch.tensor([1]))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(turned, np.flipud(np.transpose(hwc, (1, 0, 2))))
    four = dc.rotate(dc.rotate(x, r), (4 - r) % 4)
    assert torch.equal(four, x)


def test_rotations_are_drawn_from_the_generator() -> None:
    a = dc.draw_rotations(400, torch.Generator().manual_seed(3))
    b = dc.draw_rotations(400, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.long
    counts = torch.bincount(a, minlength=4)
    assert counts.min() > 60  # all four angles, about 100 each
    assert not dc.draw_rotations(5, torch.Generator(), rotation=False).any()


def test_a_quarter_turn_of_a_non_square_image_is_refused() -> None:
    x = torch.zeros(2, 1, 4, 6)
    assert dc.rotate(x, torch.tensor([0, 2])).shape == x.shape
    with pytest.raises(ValueError, match="square"):
        dc.rotate(x, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------
# Targets, heads and loss


def test_one_super_cluster_without_rotation_is_deepcluster() -> None:
    torch.manual_seed(0)
    k, batch = 10, 32
    ids = torch.randint(k, (batch,))
    super_t, sub_t = dc.targets(torch.zeros(batch, dtype=torch.long), ids, None)
    assert torch.equal(sub_t, ids) and not super_t.any()
    heads = dc.HierarchicalHeads(16, k, 1, rotation=False)
    assert heads.super_classes == 1 and len(heads.sub_heads) == 1 and heads.sub_classes == k
    z = torch.relu(torch.randn(batch, 16))
    heads.sub_heads[0].weight.data.normal_()  # logits far from uniform
    super_logits, sub_logits = heads(z, super_t)
    plain = F.cross_entropy(heads.sub_heads[0](z), ids)
    assert abs(dc.loss(super_logits, sub_logits, super_t, sub_t).item() - plain.item()) < 1e-6
    assert plain.item() > 0.1  # not a trivial zero


def test_one_cluster_with_rotation_is_rotnet() -> None:
    torch.manual_seed(0)
    batch = 32
    r = dc.draw_rotations(batch, torch.Generator().manual_seed(1))
    zeros = torch.zeros(batch, dtype=torch.long)
    super_t, sub_t = dc.targets(zeros, zeros, r)
    assert torch.equal(super_t, r) and not sub_t.any()
    heads = dc.HierarchicalHeads(16, 1, 1, rotation=True)
    assert heads.super_classes == 4 and heads.sub_classes == 1
    z = torch.relu(torch.randn(batch, 16))
    heads.super_head.weight.data.normal_()
    super_logits, sub_logits = heads(z, super_t)
    plain = F.cross_entropy(heads.super_head(z), r)
    assert abs(dc.loss(super_logits, sub_logits, super_t, sub_t).item() - plain.item()) < 1e-6
    assert plain.item() > 0.1


def test_super_class_is_super_cluster_times_four_plus_rotation() -> None:
    super_ids, sub_ids = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([3, 1, 0, 2, 2])
    r = torch.tensor([0, 3, 1, 2, 0])
    super_t, sub_t = dc.targets(super_ids, sub_ids, r)
    assert super_t.tolist() == [0, 3, 5, 10, 8]
    assert torch.equal(sub_t, sub_ids)  # the rotation does not enter the sub-class


def test_each_image_is_scored_by_the_head_of_its_own_super_class() -> None:
    torch.manual_seed(0)
    S, per_super, dim, batch = 2, 8, 6, 40
    heads = dc.HierarchicalHeads(dim, S * per_super, S, rotation=True)
    assert heads.super_classes == 8 and len(heads.sub_heads) == 8  # one per (cluster, rotation)
    super_t = torch.randint(heads.super_classes, (batch,))
    z = torch.randn(batch, dim)
    # row i comes from head super_t[i]: compare with one product per image
    rows = torch.stack([heads.sub_heads[int(h)](z[i]) for i, h in enumerate(super_t)])
    torch.testing.assert_close(heads.sub_logits(z, super_t), rows, rtol=0, atol=1e-6)
    # head h is sure of class h only: the right head gives a tiny loss, any other a large one
    for h, head in enumerate(heads.sub_heads):
        head.weight.data.zero_()
        head.bias.data.zero_()
        head.bias.data[h] = 20.0
    sub_t = super_t.clone()
    right = F.cross_entropy(heads.sub_logits(z, super_t), sub_t)
    shifted = (super_t + 1) % heads.super_classes
    wrong = F.cross_entropy(heads.sub_logits(z, shifted), sub_t)
    assert right.item() < 1e-3 and wrong.item() > 10


def test_only_the_heads_of_the_batch_super_classes_get_gradients() -> None:
    heads = dc.HierarchicalHeads(4, 6, 3, rotation=False)
    super_t, sub_t = torch.tensor([0, 0, 2]), torch.tensor([1, 0, 1])
    z = torch.randn(3, 4)
    dc.loss(*heads(z, super_t), super_t, sub_t).backward()
    touched = [
        h.weight.grad is not None and bool(h.weight.grad.abs().sum() > 0) for h in heads.sub_heads
    ]
    assert touched == [True, False, True]


def test_the_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    S, k, batch, side = 2, 8, 64, 8
    # each cluster has its own pattern, so rotation and cluster can be read off the image
    patterns = torch.rand(k, 1, side, side, generator=g)
    clusters = torch.randint(k, (batch,), generator=g)
    images = patterns[clusters] + 0.2 * torch.rand(batch, 1, side, side, generator=g)
    r = dc.draw_rotations(batch, g)
    super_t, sub_t = dc.targets(clusters // (k // S), clusters % (k // S), r)
    x = dc.rotate(images, r).flatten(1)
    trunk = nn.Linear(side * side, 32)
    heads = dc.HierarchicalHeads(32, k, S, rotation=True)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(20):
        value = dc.loss(*heads(torch.relu(trunk(x)), super_t), super_t, sub_t)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.7 * losses[0], losses


class _CornerNet(nn.Module):
    """Embeds an image as its four corners (top-left, bottom-left, bottom-right, top-right): a
    bright top-left pixel turned counter-clockwise q times lands in corner q."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.heads = nn.ModuleList([head])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0], x[:, 0, -1, 0], x[:, 0, -1, -1], x[:, 0, 0, -1]], 1)


def _corner_images(n: int = 10) -> ImageSource:
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    images[:, :, 0, 0] = 255
    return ImageSource(images, torch.device("cpu"))


def test_rotation_accuracy_sums_the_angle_over_the_super_clusters() -> None:
    """A head that reads the angle from the corner, split between S = 2 super-clusters, names
    every quarter turn; one that ignores its input names one angle, exactly chance."""
    S = 2
    knowing = nn.Linear(4, S * dc.ROTATIONS)
    with torch.no_grad():
        knowing.weight.zero_(), knowing.bias.zero_()
        for s in range(S):
            for r in range(dc.ROTATIONS):  # super-class s * R + r: angle r, weight split by s
                knowing.weight[s * dc.ROTATIONS + r, r] = 5.0 + s
    blind = nn.Linear(4, S * dc.ROTATIONS)
    with torch.no_grad():
        blind.weight.zero_()
    assert dc.rotation_accuracy(_CornerNet(knowing), _corner_images(), amp=False) == 1.0
    assert dc.rotation_accuracy(_CornerNet(blind), _corner_images(), amp=False) == 0.25


# ---------------------------------------------------------------------------------------------
# Hierarchical k-means


def blobs(n_per: int, centers: int, dim: int, seed: int = 0, spread: float = 10.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, spread, (centers, dim))
    labels = np.repeat(np.arange(centers), n_per)
    return (means[labels] + rng.normal(0, 1, (len(labels), dim))).astype(np.float32)


def test_k_must_split_into_the_super_clusters() -> None:
    x = blobs(10, 3, 4)
    with pytest.raises(ParamError, match=r"cluster\.k = 10 .*cluster\.super_clusters = 3"):
        hierarchical_kmeans(x, 10, 3, None)


def test_global_ids_are_blocks_of_k_over_s() -> None:
    x = blobs(40, 6, 12)
    h = hierarchical_kmeans(x, 12, 3, pca_dim=8, iters=10, seed=1)
    assert isinstance(h, Clustering) and isinstance(h, HierarchicalClustering)
    assert h.k == 12 and h.super_clusters == 3 and h.per_super == 4
    assert h.centroids.shape == (12, 8) and h.super_centroids.shape == (3, 8)
    np.testing.assert_array_equal(h.assignments, h.super_assignments * 4 + h.sub_assignments)
    assert h.sub_assignments.min() >= 0 and h.sub_assignments.max() < 4
    assert h.sizes().min() > 0 and h.sizes().sum() == len(x)
    # distances are to the assigned sub-centroid, in level 1's whitened space
    xw = h.whitening.apply(x)
    d = ((xw - h.centroids[h.assignments]) ** 2).sum(1)
    np.testing.assert_allclose(h.distances, d, rtol=1e-3, atol=1e-4)
    assert 0 < h.kmeans_largest_share < 1 and h.loss >= 0


def test_the_second_level_sees_only_its_own_super_cluster(monkeypatch) -> None:
    calls: list[tuple[np.ndarray, int]] = []
    real = cluster.cluster_features

    def spy(features, k, *args, **kwargs):
        calls.append((np.array(features, copy=True), k))
        return real(features, k, *args, **kwargs)

    monkeypatch.setattr(hkmeans.cluster, "cluster_features", spy)
    x = blobs(30, 4, 10, seed=2)
    h = hierarchical_kmeans(x, 9, 3, pca_dim=6, iters=10, seed=0)
    assert len(calls) == 1 + 3 and calls[0][0].shape[0] == len(x) and calls[0][1] == 3
    xw = h.whitening.apply(x)
    for s in range(3):
        rows, k = calls[1 + s]
        members = np.flatnonzero(h.super_assignments == s)
        assert k == 3 and 0 < len(members) < len(x)
        np.testing.assert_array_equal(rows, xw[members])


def test_a_super_cluster_smaller_than_k_over_s_gets_one_sub_cluster_per_image() -> None:
    x = blobs(20, 3, 8, seed=4)  # 60 images, two super-clusters of k/S = 40: one has <= 30
    h = hierarchical_kmeans(x, 80, 2, pca_dim=None, iters=10)
    sizes = np.bincount(h.super_assignments, minlength=2)
    assert sizes.min() < 40
    np.testing.assert_array_equal(h.sub_clusters, np.minimum(sizes, 40))
    per_cluster = h.sizes().reshape(2, 40)
    for s in range(2):
        made = int(h.sub_clusters[s])
        assert (per_cluster[s, :made] > 0).all() and (per_cluster[s, made:] == 0).all()
    # the padded centroid slots never win a nearest-centroid search over all k
    ids, _ = cluster.assign(h.whitening.apply(x), h.centroids)
    assert (h.sub_clusters[ids // 40] > ids % 40).all()


def test_one_super_cluster_is_flat_kmeans() -> None:
    x = blobs(50, 8, 16, seed=5)
    flat = cluster_features(x, 8, 8, iters=10, seed=0)
    h = hierarchical_kmeans(x, 8, 1, pca_dim=8, iters=10, seed=0)
    assert not h.super_assignments.any()
    assert nmi(flat.assignments, h.assignments) > 0.99


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HKMEANS_ARGS = {"k": 12, "super_clusters": 3, "pca_dim": 8, "iters": 10, "seed": 3}


def _two_process_worker(rank: int, port: int, features: np.ndarray, out: str) -> None:
    """One rank of a two-process hierarchical k-means (gloo on the CPU)."""
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        h = hierarchical_kmeans(features, ranks=Ranks(rank, 2, rank), **HKMEANS_ARGS)
        np.savez(
            Path(out) / f"rank{rank}.npz",
            super_ids=h.super_assignments, sub_ids=h.sub_assignments, ids=h.assignments,
            centroids=h.centroids,
        )  # fmt: skip
    finally:
        tdist.destroy_process_group()


def test_two_processes_cluster_as_one(tmp_path: Path) -> None:
    x = blobs(40, 9, 12, seed=6, spread=3.0)  # blobs that touch: the split is not obvious
    one = hierarchical_kmeans(x, **HKMEANS_ARGS)
    mp.start_processes(
        _two_process_worker, args=(_free_port(), x, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in range(2):  # every rank holds the whole result
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            np.testing.assert_array_equal(got["super_ids"], one.super_assignments)
            np.testing.assert_array_equal(got["sub_ids"], one.sub_assignments)
            np.testing.assert_array_equal(got["ids"], one.assignments)
            np.testing.assert_allclose(got["centroids"], one.centroids, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Training through the pipeline


@pytest.mark.slow
@pytest.mark.numerics
def test_a_resumed_deepercluster_run_matches_the_uninterrupted_run(workspace, tmp_path) -> None:
    """Three epochs, a clustering every second one: the run stopped after epoch 1 resumes into
    an epoch that keeps the last clustering, and ends where the uninterrupted run does."""
    params = fast_params(
        model={"method": "deepercluster"},
        cluster={"super_clusters": 3, "reassign_every": 2},
        train={"epochs": 3},
    )
    whole = pipeline.train(params, workspace, show=False)
    assert [h.epoch for h in whole.history] == [1, 2, 3] and whole.published
    assert whole.history[1].nmi_prev == 1.0  # epoch 2 kept epoch 1's clusters
    assert whole.history[2].nmi_prev < 1.0  # epoch 3 clustered again

    other = Artifacts(tmp_path / "stopped")
    shutil.copytree(workspace.ingest_dir, other.ingest_dir)
    shutil.copytree(workspace.cache.parent, other.cache.parent)
    stopped = pipeline.train(params, other, stop_after=1, show=False)
    assert len(stopped.history) == 1 and not stopped.published
    resumed = pipeline.train(params, other, show=False)
    assert resumed.resumed_from == 1
    assert [h.loss for h in resumed.history] == [h.loss for h in whole.history]

    a, b = checkpoint.load(workspace.published.checkpoint), checkpoint.load(other.published.checkpoint)
    np.testing.assert_array_equal(a["assignments"], b["assignments"])
    assert a["heads"] == [12] + [10] * 12  # 4 rotations x 3 super-clusters, then k/S each
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0, msg=name)
    # the published model loads and embeds as any other: later steps use the embedding
    model = checkpoint.load_model(workspace.model)
    assert model.head_sizes == a["heads"]
    assert model.embed(torch.rand(2, 3, 16, 16)).shape == (2, params.model.embed_dim)
