"""Network shapes for every architecture, the Sobel layer, and the batched augmentation."""

from __future__ import annotations

import pytest
import torch

from deepcluster import augment as aug
from deepcluster.config import ModelParams
from deepcluster.models import Normalize, Sobel, build_model, check_resolution


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
    params = ModelParams(method="deepcluster", arch=arch, sobel=sobel, embed_dim=64)
    model = build_model(params, 7).eval()
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        assert model.embed(x).shape == (2, 64)
        assert model(x).shape == (2, 7)
    model.reset_heads([11])
    assert model.head_sizes == [11]


def test_v2_scores_unit_embeddings_against_fixed_unit_prototypes() -> None:
    model = build_model(ModelParams(method="deepcluster-v2", embed_dim=16), [5, 9]).eval()
    centroids = [torch.randn(5, 16) * 3, torch.randn(9, 16)]
    model.set_prototypes(centroids)
    assert model.head_sizes == [5, 9]
    for head in model.heads:
        assert not head.weight.requires_grad and head.bias is None
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(len(head.weight)))
    with torch.no_grad():
        z = model.embed(torch.rand(4, 3, 16, 16))
        torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
        scores = model.logits(z)
    assert [s.shape for s in scores] == [(4, 5), (4, 9)]
    assert all(s.abs().max() <= 1 + 1e-5 for s in scores)  # cosine similarities


def test_input_statistics_travel_with_the_weights() -> None:
    model = build_model(ModelParams(), [3])
    model.normalize.set(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.5, 0.5]))
    copy = build_model(ModelParams(), [3])
    copy.reset_heads(model.head_sizes)
    copy.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(copy.normalize(x), (x - copy.normalize.mean) / 0.5)
    torch.testing.assert_close(copy.normalize.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_initial_body_does_not_depend_on_k() -> None:
    x = torch.randn(3, 3, 16, 16)
    outs = []
    for k in (10, 100):
        torch.manual_seed(0)
        outs.append(build_model(ModelParams(), [k]).eval().embed(x))
    torch.testing.assert_close(outs[0], outs[1])


def test_sobel_sees_edges_not_colour() -> None:
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert Sobel()(flat, Normalize())[:, :, 1:-1, 1:-1].abs().max() < 1e-6
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    assert Sobel()(step, Normalize()).abs().max() > 0


def test_sobel_folds_the_standardisation_exactly_borders_included() -> None:
    normalize, sobel = Normalize(), Sobel()
    normalize.set(torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.1, 0.3, 0.05]))
    x = torch.rand(4, 3, 12, 12)
    grey = (normalize(x) * sobel.grey).sum(dim=1, keepdim=True)  # the paper's order, step by step
    unfolded = torch.nn.functional.conv2d(grey, sobel.kernels, padding=1)
    torch.testing.assert_close(sobel(x, normalize), unfolded, rtol=1e-4, atol=1e-4)


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


def test_crops_resample_to_any_size() -> None:
    """v2's local crops: the same affine crop, resampled to a smaller square."""
    x = torch.rand(3, 3, 28, 28)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3)
    small = aug.augment(x, identity, size=14)
    assert small.shape == (3, 3, 14, 14)
    torch.testing.assert_close(small.mean(), x.mean(), atol=0.02, rtol=0)


def test_photometric_augmentation_leaves_grey_images_grey() -> None:
    from deepcluster.config import AugmentParams

    params = AugmentParams(jitter=0.8, grayscale=1.0, blur=1.0, solarize=1.0)
    grey = torch.rand(8, 1, 16, 16).expand(8, 3, 16, 16).contiguous()
    torch.manual_seed(0)
    out = aug.photometric(params, colour=False, side=16)(grey)
    assert out.shape == grey.shape and not torch.equal(out, grey)
    torch.testing.assert_close(out[:, 0], out[:, 1])  # no hue or saturation on grey data
    torch.testing.assert_close(out[:, 1], out[:, 2])
    assert 0 <= out.min() and out.max() <= 1
    colour = aug.photometric(params, colour=True, side=16)
    names = [type(step).__name__ for step in colour]
    assert "RandomGrayscale" in names and "RandomGrayscale" not in [
        type(step).__name__ for step in aug.photometric(params, colour=False, side=16)
    ]
