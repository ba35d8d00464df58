"""Batched, on-device augmentation: one affine resample per batch instead of PIL per image.

A random resized crop plus horizontal flip is an affine map of the image plane, so the whole batch is
augmented by one `affine_grid` + `grid_sample` call on whatever device holds it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ImageNet statistics: a neutral choice for natural images, and what the paper normalises with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    x = batch_u8.float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


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


def augment(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply per-image affine crops (bilinear) to a float batch; output keeps the input size."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
