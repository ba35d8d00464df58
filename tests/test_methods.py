"""Each method module on its own: its pure loss falls under a few gradient steps on a fixed
batch, through the interface the epoch loop calls, and DeeperCluster reduces to DeepCluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcluster import methods
from deepcluster.cluster import Clustering, identity_whitening
from deepcluster.methods import deepcluster, deepcluster_v2
from deepcluster.models import build_model
from deepcluster.resume import LoopState

from .conftest import fast_params

N, SIDE, K = 48, 16, 6


def _params(method: str, **cluster):
    resolved = {"k": K, "super_clusters": 1, "reassign_every": 1, **cluster}
    return fast_params(model={"method": method, "sobel": False}, cluster=resolved)


def _images() -> tuple[torch.Tensor, np.ndarray]:
    """N fixed images of K patterns (plus noise) and each one's pattern: the clusters."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.rand(K, 3, SIDE, SIDE, generator=g)
    ids = np.arange(N) % K
    return (patterns[ids] + 0.1 * torch.rand(N, 3, SIDE, SIDE, generator=g)).clamp(0, 1), ids


def _clustering(ids: np.ndarray, k: int, dim: int) -> Clustering:
    centroids = torch.nn.functional.normalize(torch.randn(k, dim), dim=1).numpy()
    return Clustering(ids, np.zeros(len(ids), np.float32), centroids, identity_whitening(dim),
                      0.0, 0, 0.0)  # fmt: skip


def _batch(params, images, ids, plan, generator) -> methods.StepBatch:
    """The whole fixed batch in the plan's order; the crops are the images themselves."""
    order = plan.order
    x = images[order]
    return methods.StepBatch(
        images=x,
        indices=order,
        targets=plan.targets(0, order),
        size=len(order),
        mine=slice(0, None, 1),
        crops=lambda count, scale, side: torch.nn.functional.interpolate(
            x.repeat(count, 1, 1, 1), size=side
        ),
        generator=generator,
    )


def _losses(method_name: str, steps: int = 8, **cluster) -> list[float]:
    torch.manual_seed(0)
    params = _params(method_name, **cluster)
    method = methods.for_params(params)
    model = build_model(params.model, method.head_sizes())
    images, ids = _images()
    clusterings = [_clustering(ids, k, params.model.embed_dim) for k in [K] * len(method.head_sizes())]
    if model.v2:  # prototypes as the clustering would set them
        model.set_prototypes([torch.from_numpy(c.centroids) for c in clusterings])
    generator = torch.Generator().manual_seed(0)
    plan = method.plan(clusterings, N, generator)
    state = LoopState(memory=torch.zeros(2, N, params.model.embed_dim))
    body = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    opt = torch.optim.SGD(body, lr=0.05, momentum=0.9)
    head_opt = method.head_optimizer(model, torch.device("cpu"))
    forward = method.step_module(model)
    model.train()
    losses = []
    for _ in range(steps):
        batch = _batch(params, images, ids, plan, torch.Generator().manual_seed(1))
        loss = method.forward_loss(forward, batch, state)
        for o in filter(None, (opt, head_opt)):
            o.zero_grad()
        loss.backward()
        for o in filter(None, (opt, head_opt)):
            o.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("method", "cluster"),
    [
        ("deepcluster", {}),
        ("deepcluster-v2", {}),
        ("deepercluster", {"super_clusters": 2}),
        ("deepercluster", {"super_clusters": 3, "rotation": False}),
    ],
)
def test_the_loss_falls_on_a_fixed_batch(method: str, cluster: dict) -> None:
    losses = _losses(method, **cluster)
    assert losses[-1] < 0.8 * losses[0], losses


def test_v1_loss_is_the_cross_entropy_of_the_head() -> None:
    logits, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    expected = -torch.log_softmax(logits, 1)[torch.arange(5), y].mean()
    torch.testing.assert_close(deepcluster.loss(logits, y), expected)


def test_v2_loss_averages_the_heads_over_every_view() -> None:
    torch.manual_seed(0)
    views, batch = 3, 4
    scores = [torch.randn(views * batch, 5), torch.randn(views * batch, 7)]
    targets = [torch.randint(5, (batch,)), torch.randint(7, (batch,))]
    each = [
        -torch.log_softmax(s / 0.1, 1)[torch.arange(views * batch), y.repeat(views)].mean()
        for s, y in zip(scores, targets, strict=True)
    ]
    torch.testing.assert_close(deepcluster_v2.loss(scores, targets, views, 0.1), sum(each) / 2)


def test_deepercluster_with_one_super_cluster_and_no_rotation_is_deepcluster() -> None:
    """The same network and batch: DeeperCluster's sub-head gives v1's loss and gradients."""
    v1_params = _params("deepcluster")
    deeper_params = _params("deepercluster", rotation=False)
    v1, deeper = methods.for_params(v1_params), methods.for_params(deeper_params)
    assert deeper.head_sizes() == [1, K] and v1.head_sizes() == [K]
    torch.manual_seed(0)
    a = build_model(v1_params.model, v1.head_sizes())
    torch.manual_seed(0)
    b = build_model(deeper_params.model, deeper.head_sizes())
    b.heads[1].load_state_dict(a.heads[0].state_dict())
    images, ids = _images()
    clusterings = [_clustering(ids, K, 8)]
    plans = [m.plan(clusterings, N, torch.Generator().manual_seed(0)) for m in (v1, deeper)]
    np.testing.assert_array_equal(plans[0].order, plans[1].order)  # the same draws
    losses = []
    for method, model, plan in ((v1, a, plans[0]), (deeper, b, plans[1])):
        model.train()
        batch = _batch(None, images, ids, plan, torch.Generator().manual_seed(1))
        loss = method.forward_loss(method.step_module(model), batch, LoopState())
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == losses[1].item()
    assert torch.equal(a.heads[0].weight.grad, b.heads[1].weight.grad)
    assert torch.equal(a.trunk[0].weight.grad, b.trunk[0].weight.grad)


def test_deepercluster_keeps_its_clustering_between_reassignments() -> None:
    method = methods.for_params(_params("deepercluster", reassign_every=3))
    assert [method.reclusters(e) for e in range(7)] == [True, False, False, True, False, False, True]
    assert all(methods.for_params(_params(m)).reclusters(1) for m in ("deepcluster", "deepcluster-v2"))
