"""Batched, on-device augmentation: whole batches at once instead of PIL per image. A random
resized crop and flip is an affine map, so a batch of crops (any output size) is one
`affine_grid`/`grid_sample` call, drawn from the training's generator (a resumed run draws the
same crops). Photometry (colour jitter, grayscale, blur, solarisation): kornia's, per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AugmentParams


def to_float(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1]; the network standardises it."""
    return batch_u8.float().div_(255.0)


def crop_flip_params(
    n: int,
    scale: tuple[float, float],
    hflip: bool,
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Affine matrices (n, 2, 3) in normalised coordinates for random resized crops and flips."""
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width as a fraction of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)  # crop centre, crop stays inside
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.ones(n)
    if hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def augment(x: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Per-image affine crops (bilinear) of a float batch, resampled to `size` (default: same)."""
    side = x.shape[-1] if size is None else size
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], side, side], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def photometric(params: AugmentParams, colour: bool, side: int) -> nn.Module:
    """kornia's per-image photometric augmentations for float batches in [0, 1].

    Hue, saturation and grayscale only act on colour, so grey data skips them. The blur's width
    follows the image size (SimCLR blurs 224 px images with sigma up to 2).
    """
    j = params.jitter
    if not (j > 0 or (colour and params.grayscale > 0) or params.blur > 0 or params.solarize > 0):
        return nn.Sequential()  # none asked for: no kornia needed (a machine without it trains)
    import kornia.augmentation as K

    steps: list[nn.Module] = []
    if j > 0:
        saturation, hue = (j, min(0.5, j / 4)) if colour else (0.0, 0.0)
        steps.append(K.ColorJitter(j, j, saturation, hue, p=0.8))
    if colour and params.grayscale > 0:
        steps.append(K.RandomGrayscale(p=params.grayscale))
    if params.blur > 0:
        sigma = max(0.5, 2.0 * side / 224)
        kernel = 2 * math.ceil(2 * sigma) + 1
        steps.append(K.RandomGaussianBlur((kernel, kernel), (0.1, sigma), p=params.blur))
    if params.solarize > 0:
        steps.append(K.RandomSolarize(0.0, 0.0, p=params.solarize))  # threshold 0.5
    return nn.Sequential(*steps)
