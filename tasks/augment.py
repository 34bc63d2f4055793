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
# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601-2), which its ColorJitter uses on tensors.
_GRAY = (0.2989, 0.587, 0.114)
# The six orders in which ColorJitter may apply brightness (0), contrast (1) and saturation (2).
_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def normalize(x_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """ToTensor + Normalize for a uint8 batch [B, 3, H, W]."""
    return _normalize_float(x_uint8.float().div_(255), mean, std)


def _normalize_float(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma (two fused multiply-adds: several times faster than einsum or a 1x1 conv)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.addcmul(torch.addcmul(r * _GRAY[0], g, torch.tensor(_GRAY[1])), b, torch.tensor(_GRAY[2]))


def _flip_and_rotate(x: torch.Tensor, flip: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Flip (where asked), then rotate about the centre: nearest neighbour, black fill, as
    RandomHorizontalFlip then RandomRotation(10). Both are one sampling grid, so one pass."""
    theta = degrees * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    mirror = 1 - 2 * flip.to(cos.dtype)  # -1 flips: sample the input at -x
    zero = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([mirror * cos, -mirror * sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _brightness_(x: torch.Tensor, f: torch.Tensor) -> None:
    x.mul_(f).clamp_(0, 1)


def _contrast_(x: torch.Tensor, f: torch.Tensor) -> None:
    # The mean luma is the luma of the channel means: one cheap reduction, no grey image.
    channel_means = x.mean(dim=(2, 3))
    weights = torch.tensor(_GRAY, dtype=x.dtype, device=x.device)
    mean = (channel_means @ weights).view(-1, 1, 1, 1)
    x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)  # f * x + (1 - f) * mean


def _saturation_(x: torch.Tensor, f: torch.Tensor) -> None:
    gray = _grayscale(x)
    x.mul_(f).addcmul_(gray, 1 - f).clamp_(0, 1)  # f * x + (1 - f) * gray


_JITTER_OPS = (_brightness_, _contrast_, _saturation_)


def _color_jitter_(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> None:
    """In place: each sample's three jitter ops in its own order, each clamped to [0, 1] as
    torchvision does. Samples are grouped by order, so each group is one contiguous slice."""
    codes = torch.tensor([_ORDERS.index(tuple(o)) for o in order.tolist()], device=x.device)
    for code, ops in enumerate(_ORDERS):
        rows = (codes == code).nonzero().squeeze(1)
        if not rows.numel():
            continue
        group = x[rows]
        for op_index in ops:
            _JITTER_OPS[op_index](group, factors[op_index, rows].view(-1, 1, 1, 1))
        x[rows] = group


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
    device = x_uint8.device
    x = _flip_and_rotate(x_uint8.float().div_(255), params.flip.to(device), params.angle.to(device))
    _color_jitter_(x, params.factors.to(device, x.dtype), params.order)
    return _normalize_float(x, mean, std)


def augment_batch(
    x_uint8: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator,
) -> torch.Tensor:
    """Random flip, rotation and colour jitter per sample, then normalize. Float32 [B, 3, H, W]."""
    return apply_augmentation(x_uint8, draw_augmentation(x_uint8.shape[0], generator), mean, std)
