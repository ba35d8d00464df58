"""Network shapes for every architecture, the Sobel layer, and the batched augmentation."""

from __future__ import annotations

import pytest
import torch

from deepcluster import augment as aug
from deepcluster.config import ModelParams
from deepcluster.models import Sobel, build_model, check_resolution


@pytest.mark.parametrize(
    ("arch", "side", "sobel"),
    [
        ("smallconv", 16, False),
        ("smallconv", 32, True),
        ("alexnet", 64, True),
        ("vgg16", 32, False),
        ("resnet18", 32, False),
    ],
)
def test_every_arch_embeds_and_classifies(arch: str, side: int, sobel: bool) -> None:
    params = ModelParams(arch=arch, sobel=sobel, embed_dim=64)
    model = build_model(params, num_classes=7).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert model.embed(x).shape == (2, 64)
        assert model(x).shape == (2, 7)
    model.reset_head(11)
    assert model.head.out_features == 11


def test_initial_body_does_not_depend_on_k() -> None:
    x = torch.randn(3, 3, 16, 16)
    outs = []
    for k in (10, 100):
        torch.manual_seed(0)
        outs.append(build_model(ModelParams(), k).eval().embed(x))
    torch.testing.assert_close(outs[0], outs[1])


def test_sobel_sees_edges_not_colour() -> None:
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert Sobel()(flat)[:, :, 1:-1, 1:-1].abs().max() < 1e-6
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    assert Sobel()(step).abs().max() > 0


def test_too_small_resolution_for_alexnet_is_refused() -> None:
    with pytest.raises(ValueError, match="needs data.resolution >= 63"):
        check_resolution("alexnet", 32)


def test_identity_crop_and_flip() -> None:
    x = torch.rand(2, 3, 8, 8)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    torch.testing.assert_close(aug.augment(x, identity), x, atol=1e-5, rtol=0)
    flip = torch.tensor([[-1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    torch.testing.assert_close(aug.augment(x, flip), x.flip(-1), atol=1e-5, rtol=0)


def test_random_crops_stay_inside_and_respect_the_scale_range() -> None:
    g = torch.Generator().manual_seed(0)
    theta = aug.crop_flip_params(4096, (0.3, 0.8), True, g)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert ((w * h) <= 0.8 + 1e-6).all() and ((w * h) >= 0.3 * 0.74).all()  # clamping may shrink
    assert ((theta[:, 0, 2].abs() + w) <= 1 + 1e-6).all()
    assert ((theta[:, 1, 2].abs() + h) <= 1 + 1e-6).all()
    flipped = (theta[:, 0, 0] < 0).float().mean()
    assert 0.45 < flipped < 0.55
    no_flip = aug.crop_flip_params(256, (0.3, 0.8), False, g)
    assert (no_flip[:, 0, 0] > 0).all()
