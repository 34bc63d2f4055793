"""The seed's training augmentation, applied per sample to whole uint8 batches.

Same transforms and distributions as torchvision's
`RandomHorizontalFlip(0.5) -> RandomRotation(10) -> ColorJitter(0.2, 0.2, 0.2) -> ToTensor -> Normalize`
on each image (the resize happened once at decode time): every sample draws its own flip, angle,
jitter factors and jitter order, and the result equals torchvision's functional ops with the same
draws (tests/test_augment.py). Doing it on uint8 tensors instead of PIL images is what makes an epoch
cost about what the network costs.

Why the code looks the way it does (each measured here, 2 CPU cores):
- A few images at a time go from uint8 to the output: they stay in cache through every pass, where a
  whole batch's passes go to memory (rotation alone is about 2x faster in chunks of 4 than of 16).
- The jitter runs image by image with plain numbers as factors: an op with a scalar is 10-30x
  faster than the same op broadcasting a [B, 1, 1, 1] tensor of per-sample factors, and each image
  can then skip the clamps that cannot change it (a factor at most 1 blends towards a value in range).
- Pixels stay on the 0-255 scale until Normalize, which takes ToTensor's division by 255 along.
- Flip and rotation are one sampling grid, built from two broadcast products (no batched matmul).

On a GPU the opposite holds: each op is a kernel launch of a few microseconds, so the whole batch goes
through every pass at once and the jitter takes per-sample factors as [B, 1, 1, 1] tensors (about 40
launches a batch, whatever its size). Same draws, same pixels within float rounding
(tests/test_gpu.py compares the two paths).
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
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
_TOP = 255.0  # pixels keep the uint8 scale through the jitter
_CHUNK = 4  # images taken through all the passes together


def normalize(
    x_uint8: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """ToTensor + Normalize for a uint8 batch [B, 3, H, W], output in `memory_format`."""
    x = x_uint8.float()
    _normalize_(x, mean, std)
    return x.contiguous(memory_format=memory_format)


def _normalize_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """In place, on the 0-255 scale: (x / 255 - mean) / std, channel by channel with plain numbers."""
    for c, (m, s) in enumerate(zip(mean, std)):
        x[:, c].mul_(1 / (_TOP * s)).add_(-m / s)


def _rotation_grid(flip: torch.Tensor, degrees: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """`F.affine_grid` (align_corners=False) of a flip (where asked) then a rotation about the centre.

    The grid is separable, sample x = a * column + c * row, so two broadcast products build it: several
    times cheaper than affine_grid's batched matmul with an inner dimension of 3."""
    theta = degrees.float() * (math.pi / 180)
    cos, sin = torch.cos(theta).view(b, 1, 1), torch.sin(theta).view(b, 1, 1)
    mirror = 1 - 2 * flip.float().view(b, 1, 1)  # -1 flips: sample the input at -x
    # Pixel centres in [-1, 1] exactly as affine_grid computes them.
    cols = (torch.linspace(-1, 1, w, device=flip.device) * ((w - 1) / w)).view(1, 1, w)
    rows = (torch.linspace(-1, 1, h, device=flip.device) * ((h - 1) / h)).view(1, h, 1)
    grid = torch.empty(b, h, w, 2, device=flip.device)
    torch.add(mirror * cos * cols, -mirror * sin * rows, out=grid[..., 0])
    torch.add(sin * cols, cos * rows, out=grid[..., 1])
    return grid


def _flip_and_rotate(x: torch.Tensor, flip: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """RandomHorizontalFlip then RandomRotation(10): nearest neighbour, black fill, one pass."""
    b, _, h, w = x.shape
    grid = _rotation_grid(flip, degrees, b, h, w)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _color_jitter_(x: torch.Tensor, order: list[int], factors: list[float], luma: torch.Tensor) -> None:
    """In place on one image [3, H, W] (0-255 scale): torchvision's adjust_brightness, _contrast and
    _saturation in the given order, each `clamp(f * x + (1 - f) * target, 0, 255)`."""
    for step, op in enumerate(order):
        f = factors[op]
        if op == BRIGHTNESS:
            x.mul_(f)
        elif op == CONTRAST:  # towards the image's mean luma, which is the luma of its channel means
            mean = x.mean(dim=(1, 2)) @ luma
            x.mul_(f).add_(mean, alpha=1 - f)
        else:  # towards each pixel's luma
            k = [w * (1 - f) for w in _GRAY]
            gray = (x[0:1] * k[0]).add_(x[1:2], alpha=k[1]).add_(x[2:3], alpha=k[2])
            x.mul_(f).add_(gray)
        # A blend with f <= 1 stays in range; the last op clamps anyway so that float rounding cannot
        # leave the output a hair outside it.
        if f > 1 or step == len(order) - 1:
            x.clamp_(0, _TOP)


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


def draws_to(draws: list[AugmentParams], device: torch.device) -> list[AugmentParams]:
    """An epoch's draws on `device` in four copies instead of four per batch: a copy from pageable host
    memory waits for the GPU to finish its queue, which would stall every step."""
    if device.type == "cpu" or not draws:
        return draws
    sizes = [len(d.flip) for d in draws]

    def moved(tensors: list[torch.Tensor], dim: int = 0) -> tuple[torch.Tensor, ...]:
        return torch.cat(tensors, dim).to(device).split(sizes, dim)

    return [AugmentParams(*p) for p in zip(moved([d.flip for d in draws]), moved([d.angle for d in draws]),
                                           moved([d.factors for d in draws], 1), moved([d.order for d in draws]))]


SEED_HFLIP = 0.5  # the seed's RandomHorizontalFlip probability


def draw_augmentation(b: int, generator: torch.Generator, hflip: float = SEED_HFLIP) -> AugmentParams:
    """`hflip` is the probability of a horizontal flip (0: never). The same numbers are drawn whatever
    it is, so the other draws of a seed do not depend on it."""
    # All randomness is drawn on the CPU from `generator`, so a seed fixes it on any device.
    flip = torch.rand(b, generator=generator) < hflip
    angle = (torch.rand(b, generator=generator) * 2 - 1) * ROTATION_DEGREES
    factors = 1 + (torch.rand(3, b, generator=generator) * 2 - 1) * JITTER
    order = torch.argsort(torch.rand(b, 3, generator=generator), dim=1)
    return AugmentParams(flip, angle, factors, order)


def apply_augmentation(
    x_uint8: torch.Tensor,
    params: AugmentParams,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    memory_format: torch.memory_format = torch.contiguous_format,
    batched: bool | None = None,
) -> torch.Tensor:
    """Flip, rotation and colour jitter with the given draws, then normalize. Float32 [B, 3, H, W]
    in `memory_format` (channels_last saves the network a copy). `batched` (default: on any device but
    the CPU) takes the whole batch through each pass at once."""
    device = x_uint8.device
    if batched if batched is not None else device.type != "cpu":
        return _apply_batched(x_uint8, params, mean, std, memory_format)
    flip, angle = params.flip.to(device), params.angle.to(device)
    factors, orders = params.factors.t().tolist(), params.order.tolist()
    luma = torch.tensor(_GRAY, device=device)
    out = torch.empty(x_uint8.shape, dtype=torch.float32, device=device, memory_format=memory_format)
    for start in range(0, len(x_uint8), _CHUNK):
        rows = slice(start, start + _CHUNK)
        x = _flip_and_rotate(x_uint8[rows].float(), flip[rows], angle[rows])
        for i, image in enumerate(x, start):
            _color_jitter_(image, orders[i], factors[i], luma)
        _normalize_(x, mean, std)
        out[rows] = x
    return out


def _color_jitter_batch_(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> None:
    """`_color_jitter_` on a whole batch [B, 3, H, W] in place: at each of the three steps every sample
    blends towards its own op's target (0 for brightness, its mean luma for contrast, each pixel's luma
    for saturation) with its own factor. Clamping after every step, where the per-image version skips the
    clamps that cannot change anything, differs only by float rounding."""
    b = x.shape[0]
    factors = factors.to(x.dtype)
    for step in range(3):
        op = order[:, step]
        f = factors.gather(0, op.view(1, b)).view(b, 1, 1, 1)
        op = op.view(b, 1, 1, 1)
        gray = (x[:, 0:1] * _GRAY[0]).add_(x[:, 1:2], alpha=_GRAY[1]).add_(x[:, 2:3], alpha=_GRAY[2])
        target = torch.where(op == CONTRAST, gray.mean(dim=(2, 3), keepdim=True), gray)
        target.mul_((op != BRIGHTNESS) * (1 - f))
        x.mul_(f).add_(target).clamp_(0, _TOP)


def _apply_batched(
    x_uint8: torch.Tensor,
    params: AugmentParams,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    memory_format: torch.memory_format,
) -> torch.Tensor:
    device = x_uint8.device
    x = _flip_and_rotate(x_uint8.float(), params.flip.to(device), params.angle.to(device))
    _color_jitter_batch_(x, params.order.to(device), params.factors.to(device))
    _normalize_(x, mean, std)
    return x.contiguous(memory_format=memory_format)


def augment_batch(
    x_uint8: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    generator: torch.Generator,
) -> torch.Tensor:
    """Random flip, rotation and colour jitter per sample, then normalize. Float32 [B, 3, H, W]."""
    return apply_augmentation(x_uint8, draw_augmentation(x_uint8.shape[0], generator), mean, std)
