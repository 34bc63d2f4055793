"""The seed's training augmentation, applied per sample to whole uint8 batches.

Same transforms and distributions as torchvision's
`RandomHorizontalFlip(0.5) -> RandomRotation(10) -> ColorJitter(0.2, 0.2, 0.2) -> ToTensor -> Normalize`
on each image (the resize happened once at decode time): every sample draws its own flip, angle,
jitter factors and jitter order. Doing it on batched tensors instead of PIL images is what makes an
epoch cost about what the network costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROTATION_DEGREES = 10.0
JITTER = 0.2  # brightness, contrast and saturation factors uniform in [0.8, 1.2]
_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601-2 luma, as PIL and torchvision


def normalize(x_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """ToTensor + Normalize for a uint8 batch [B, 3, H, W]."""
    x = x_uint8.float().div_(255)
    return _normalize_float(x, mean, std)


def _normalize_float(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    return (x * _GRAY.to(x.device, x.dtype)).sum(dim=1, keepdim=True)


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre, nearest neighbour, black fill (RandomRotation's defaults)."""
    theta = degrees * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(x).mean(dim=(2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * _grayscale(x)).clamp_(0, 1)


_JITTER_OPS = (_brightness, _contrast, _saturation)


@dataclass
class AugmentParams:
    """Each sample's random draws: flip, rotation angle, jitter factors and jitter order."""

    flip: torch.Tensor  # bool [B]
    angle: torch.Tensor  # degrees [B]
    factors: torch.Tensor  # [3, B]: brightness, contrast, saturation
    order: torch.Tensor  # [B, 3]: a permutation of the three jitter ops per sample

    def select(self, rows: torch.Tensor) -> "AugmentParams":
        """The draws of some samples: a rank of a data-parallel run takes its share of a global batch."""
        return AugmentParams(self.flip[rows], self.angle[rows], self.factors[:, rows], self.order[rows])


def draw_augmentation(b: int, generator: torch.Generator) -> AugmentParams:
    # All randomness is drawn on the CPU from `generator`, so a seed fixes it on any device.
    flip = torch.rand(b, generator=generator) < 0.5
    angle = (torch.rand(b, generator=generator) * 2 - 1) * ROTATION_DEGREES
    factors = 1 + (torch.rand(3, b, generator=generator) * 2 - 1) * JITTER
    order = torch.argsort(torch.rand(b, 3, generator=generator), dim=1)
    return AugmentParams(flip, angle, factors, order)


def apply_augmentation(
    x_uint8: torch.Tensor, params: AugmentParams, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Flip, rotation and colour jitter with the given draws, then normalize. Float32 [B, 3, H, W]."""
    b = x_uint8.shape[0]
    device = x_uint8.device
    x = x_uint8.float().div_(255)
    x = torch.where(params.flip.to(device).view(b, 1, 1, 1), x.flip(-1), x)
    x = _rotate(x, params.angle.to(device))
    factors = params.factors.to(device).view(3, b, 1, 1, 1)
    order = params.order.to(device)
    for position in range(3):
        for op_index, op in enumerate(_JITTER_OPS):
            rows = (order[:, position] == op_index).nonzero().squeeze(1)
            if rows.numel():
                x[rows] = op(x[rows], factors[op_index, rows])
    return _normalize_float(x, mean, std)


def augment_batch(
    x_uint8: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator,
) -> torch.Tensor:
    """Random flip, rotation and colour jitter per sample, then normalize. Float32 [B, 3, H, W]."""
    return apply_augmentation(x_uint8, draw_augmentation(x_uint8.shape[0], generator), mean, std)
