"""Stronger training augmentation: RandomResizedCrop, TrivialAugmentWide and RandAugment, per sample.

`augment: trivial` is a horizontal flip (probability `hflip`) then torchvision's TrivialAugmentWide: one
op per image, uniformly among its 14, a magnitude uniformly among its 31 bins, its sign random where
the op is signed. `augment: randaugment` is the flip then torchvision's RandAugment defaults: two ops
per image, magnitude bin 9 of 31. `random_resized_crop: s` puts torchvision's
RandomResizedCrop(img_size, scale=(s, 1), ratio=(3/4, 4/3), bilinear) before any policy, the seed's
included (whose draws and pixels stay those of harv_train/core/augment.py; the engine runs the seed
policy without a crop through that module alone).

Every random number is drawn on the CPU from the epoch's generator, in a fixed order and a fixed
count per sample (`draw_policy`), so that a retried or resumed epoch redraws the same and the ops'
draws do not depend on `hflip` or on whether the crop is on. The draws hold plain per-sample values
(flip, crop box, op, signed magnitude); `apply_policy` turns them into the pixels torchvision's own
functional ops give on uint8 images (tests/test_policies.py: exact, op by op and bin by bin).

Why it is not torchvision.transforms.v2 image by image: that costs 2-2.8x more for the same pixels,
over the 0.6 s budget for an epoch of 500 images at 224 px in every setting but TrivialAugmentWide
without the crop (docs/data.md has the figures, benchmarks/bench_augment.py
the command). What makes the difference:
- A few images at a time go from uint8 to float once, through every op, and are normalized while
  still in cache into the output's layout. Between ops they stay float on the 0-255 scale, holding
  whole numbers: each op ends with the rounding or truncation of torchvision's uint8 kernel, so
  nothing converts back and forth.
- The geometric ops of a chunk (ShearX/Y, TranslateX/Y, Rotate) are one nearest-neighbour
  `grid_sample`, each image with its own matrix, the grid built by broadcast products (not a matmul).
- Sharpness's blur is an exact integer box sum instead of a depthwise convolution.
- Colour ops run image by image with plain numbers as factors; the crop is torchvision's own
  `resized_crop` image by image (fast on uint8, and rounded exactly as torchvision rounds).
The same code runs on any device; there each op is a kernel launch per image or chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from harv_train.core.augment import AugmentParams, _normalize_, apply_augmentation, draw_augmentation

POLICIES = ("seed", "trivial", "randaugment")
# Both policies' op lists, in torchvision's order (its _AUGMENTATION_SPACE of TrivialAugmentWide and RandAugment).
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"})
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BINS = 31  # both policies' num_magnitude_bins default
RANDAUGMENT_OPS_PER_IMAGE, RANDAUGMENT_LEVEL = 2, 9  # RandAugment(num_ops=2, magnitude=9)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios
CROP_TRIES = 10  # RandomResizedCrop's tries before it falls back to a centre crop


def magnitudes(policy: str, height: int, width: int) -> dict[str, torch.Tensor | None]:
    """Each op's magnitude per bin, as torchvision's policy computes them (tests compare the two tables)."""
    n = BINS
    if policy == "trivial":
        shear, translate_x, translate_y, rotate, enhance, posterize_bits = 0.99, 32.0, 32.0, 135.0, 0.99, 6
    elif policy == "randaugment":
        shear, rotate, enhance, posterize_bits = 0.3, 30.0, 0.9, 4
        translate_x, translate_y = 150.0 / 331.0 * width, 150.0 / 331.0 * height
    else:
        raise ValueError(f"augment must be one of {', '.join(POLICIES)}, got {policy!r}")
    return {
        "Identity": None,
        "ShearX": torch.linspace(0.0, shear, n), "ShearY": torch.linspace(0.0, shear, n),
        "TranslateX": torch.linspace(0.0, translate_x, n), "TranslateY": torch.linspace(0.0, translate_y, n),
        "Rotate": torch.linspace(0.0, rotate, n),
        "Brightness": torch.linspace(0.0, enhance, n), "Color": torch.linspace(0.0, enhance, n),
        "Contrast": torch.linspace(0.0, enhance, n), "Sharpness": torch.linspace(0.0, enhance, n),
        "Posterize": (8 - (torch.arange(n) / ((n - 1) / posterize_bits))).round().int(),
        "Solarize": torch.linspace(1.0, 0.0, n),
        "AutoContrast": None, "Equalize": None,
    }


@dataclass
class PolicyDraws:
    """Each sample's draws: flip, crop box, and per op step the op and its signed magnitude (or the seed
    policy's draws)."""

    flip: torch.Tensor  # bool [B]
    box: torch.Tensor  # int64 [B, 4]: top, left, height, width of the crop (the whole image when it is off)
    op: torch.Tensor  # int64 [B, K]: an index into OPS, K ops applied in order
    magnitude: torch.Tensor  # float64 [B, K]: the value torchvision would pass to the op (0 where it takes none)
    crop: bool  # random_resized_crop is on
    seed: AugmentParams | None = None  # augment: seed (its flip is in there; op and magnitude are empty)

    def select(self, rows: torch.Tensor) -> "PolicyDraws":
        """The draws of some samples: a rank of a data-parallel run takes its share of a global batch."""
        return PolicyDraws(self.flip[rows], self.box[rows], self.op[rows], self.magnitude[rows], self.crop,
                           None if self.seed is None else self.seed.select(rows))


def _crop_boxes(u: torch.Tensor, height: int, width: int, min_scale: float) -> torch.Tensor:
    """RandomResizedCrop's box rule for every sample at once, from uniforms u [B, 2 * CROP_TRIES + 2]:
    up to CROP_TRIES (area, log-ratio) tries, the first that fits wins and places the box uniformly; when
    none fits, the centre crop of the nearest allowed ratio."""
    b = len(u)
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    target = area * (min_scale + (1 - min_scale) * u[:, :CROP_TRIES])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, CROP_TRIES : 2 * CROP_TRIES])
    w = torch.sqrt(target * ratio).round()  # round half to even, as Python's round()
    h = torch.sqrt(target / ratio).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    top = torch.floor(u[:, -2] * (height - h + 1))
    left = torch.floor(u[:, -1] * (width - w + 1))
    # The fallback: the whole image, or its centre at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        fw, fh = int(round(height * CROP_RATIO[1])), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64).expand(b, 4)
    boxes = torch.stack([top, left, h, w], 1)
    return torch.where(fits.any(1, keepdim=True), boxes, fallback).long()


def _whole(b: int, height: int, width: int) -> torch.Tensor:
    return torch.tensor([0, 0, height, width]).expand(b, 4).clone()


def draw_policy(
    b: int,
    generator: torch.Generator,
    policy: str,
    size: tuple[int, int],
    hflip: float = 0.5,
    crop_scale: float = 0.0,
) -> PolicyDraws:
    """Draw `b` samples' augmentation for images of `size` (height, width). `crop_scale` in (0, 1) turns
    RandomResizedCrop on with scale (crop_scale, 1); 0 leaves it off. The same numbers are drawn whatever
    `hflip` and `crop_scale` are, so the ops of a seed do not depend on them."""
    height, width = size
    if policy == "seed":  # the seed's draws as they always were, then the crop's
        seed = draw_augmentation(b, generator, hflip)
        u = torch.rand(b, 2 * CROP_TRIES + 2, generator=generator, dtype=torch.float64)
        box = _crop_boxes(u, height, width, crop_scale) if crop_scale > 0 else _whole(b, height, width)
        return PolicyDraws(seed.flip, box, torch.zeros(b, 0, dtype=torch.long), torch.zeros(b, 0, dtype=torch.float64),
                           crop_scale > 0, seed)
    steps = RANDAUGMENT_OPS_PER_IMAGE if policy == "randaugment" else 1
    table = magnitudes(policy, height, width)
    flip = torch.rand(b, generator=generator) < hflip
    u = torch.rand(b, 2 * CROP_TRIES + 2, generator=generator, dtype=torch.float64)
    op = torch.randint(len(OPS), (b, steps), generator=generator)
    level = torch.randint(BINS, (b, steps), generator=generator)
    negate = torch.rand(b, steps, generator=generator) <= 0.5
    if policy == "randaugment":
        level.fill_(RANDAUGMENT_LEVEL)
    box = _crop_boxes(u, height, width, crop_scale) if crop_scale > 0 else _whole(b, height, width)
    magnitude = torch.zeros(b, steps, dtype=torch.float64)
    for i, (o, lv, neg) in enumerate(zip(op.tolist(), level.tolist(), negate.tolist())):
        for k in range(steps):
            values = table[OPS[o[k]]]
            if values is not None:
                m = float(values[lv[k]])
                magnitude[i, k] = -m if neg[k] and OPS[o[k]] in SIGNED else m
    return PolicyDraws(flip, box, op, magnitude, crop_scale > 0)


def _inverse_affine(center: list[float], angle: float, translate: list[float], shear: list[float]) -> list[float]:
    """torchvision's `_get_inverse_affine_matrix` at scale 1: output pixel -> input pixel, both relative
    to the image centre."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    cos_sy, tan_sx = math.cos(sy), math.tan(sx)
    a = math.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + math.sin(rot))
    c = math.sin(rot - sy) / cos_sy
    d = math.cos(rot) - c * tan_sx
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty)
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty)
    return m


def _geometric_matrix(name: str, m: float, height: int, width: int) -> list[float]:
    """The matrix torchvision's policies hand to `affine` (or `rotate`) for op `name`, magnitude m."""
    if name == "ShearX":  # about the top-left corner: the policies pass center=[0, 0]
        return _inverse_affine([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], [math.degrees(math.atan(m)), 0.0])
    if name == "ShearY":
        return _inverse_affine([-width * 0.5, -height * 0.5], 0.0, [0.0, 0.0], [0.0, math.degrees(math.atan(m))])
    if name == "TranslateX":
        return _inverse_affine([0.0, 0.0], 0.0, [float(int(m)), 0.0], [0.0, 0.0])
    if name == "TranslateY":
        return _inverse_affine([0.0, 0.0], 0.0, [0.0, float(int(m))], [0.0, 0.0])
    # Rotate: `rotate` takes the angle modulo 360 and hands its negative to the matrix.
    return _inverse_affine([0.0, 0.0], -(m % 360), [0.0, 0.0], [0.0, 0.0])


def _affine_nearest(x: torch.Tensor, matrices: list[list[float]]) -> torch.Tensor:
    """Each image of x [n, C, H, W] (float, integer values) through its own inverse affine matrix:
    nearest neighbour, black fill, torchvision's `affine` grid. Built from two broadcast products per
    coordinate instead of its batched matmul (3-4x cheaper here); the two differ in the last bit, which
    moves a nearest-neighbour tie a few pixels in a million (tests/test_policies.py bounds it)."""
    n, _, h, w = x.shape
    device = x.device
    m = torch.tensor(matrices, dtype=torch.float32, device=device).view(n, 6, 1, 1)
    # Output pixel centres relative to the image centre, as `_affine_grid` lays them out; the matrix maps
    # them to input pixels, which grid_sample wants in [-1, 1] (divided by half the size).
    cols = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device).view(1, 1, w)
    rows = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).view(1, h, 1)
    grid = torch.empty(n, h, w, 2, device=device)
    for c, scale in ((0, 0.5 * w), (1, 0.5 * h)):  # in the matmul's order: column term, row term, then the constant
        a, b, k = (m[:, 3 * c + j] / scale for j in range(3))
        torch.add(a * cols, b * rows, out=grid[..., c]).add_(k)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def resized_crop(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Each image of uint8 x [n, C, H, W] cropped to its box (top, left, height, width) and resized back to
    H x W, bilinear: torchvision's `resized_crop` image by image. Its uint8 kernel is both the exact
    reference and faster per image than one bilinear `grid_sample` over the batch (measured: 315 against
    680 us an image at 224 px), whose rounding also differs by one here and there, which Posterize,
    Solarize and Equalize then turn into large differences."""
    size = list(x.shape[-2:])
    return torch.stack([TF.resized_crop(image, *b, size, antialias=True) for image, b in zip(x, box.tolist())])


# The colour ops on one float image [3, H, W] holding uint8 values, as torchvision's uint8 kernels
# compute them (the same float operations in the same order; `.floor_()` is their cast back to uint8).
def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(0)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(0).floor_()


def _blend_(x: torch.Tensor, other: torch.Tensor | None, f: float) -> torch.Tensor:
    x.mul_(f)
    if other is not None:
        x.add_(other, alpha=1.0 - f)
    return x.clamp_(0, 255).floor_()


def _sharpness_(x: torch.Tensor, f: float) -> torch.Tensor:
    """torchvision's adjust_sharpness: the inside of the image blended with its blur by the kernel
    [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded. The blur is a 3 x 3 box sum plus 4 x the centre,
    summed exactly (integers), then / 13: a fifth of the depthwise conv's cost, and the same rounding,
    since k / 13 is never within 0.038 of a half."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    inner = x[..., 1:-1, 1:-1]
    blurred = box.add_(inner, alpha=4.0).div_(13.0).round_()
    inner.add_(blurred.sub_(inner), alpha=1.0 - f)
    return x.clamp_(0, 255).floor_()


def _autocontrast_(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = high.sub_(low).mul_(1.0 / 255)
    low[flat], scale[flat] = 0.0, 1.0
    return x.sub_(low).div_(scale).clamp_(0, 255).floor_()


def _posterize_(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits >= 8:
        return x
    step = float(1 << (8 - bits))  # keeping the top `bits` bits: a multiple of a power of two, exact in float
    return x.div_(step).floor_().mul_(step)


def _solarize_(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 255 - x, x, out=x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    return TF.equalize(x.to(torch.uint8)).float()  # a histogram of integers: torchvision's kernel on uint8


_PER_IMAGE = {  # name -> op on one image, in place where it can be, given the magnitude
    "Brightness": lambda x, m: _blend_(x, None, 1.0 + m),
    "Color": lambda x, m: _blend_(x, _gray(x), 1.0 + m),
    "Contrast": lambda x, m: _blend_(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), 1.0 + m),
    "Sharpness": lambda x, m: _sharpness_(x, 1.0 + m),
    "Posterize": lambda x, m: _posterize_(x, int(m)),
    "Solarize": lambda x, m: _solarize_(x, 255 * m),
    "AutoContrast": lambda x, m: _autocontrast_(x),
    "Equalize": lambda x, m: _equalize(x),
}

# Images taken through every pass together: they stay in cache (4 at 224 px, as in augment.py), more
# when they are smaller, so that small images do not pay per-call overhead image by image.
_CHUNK_PIXELS = 4 * 224 * 224


def _augmented_chunks(x_uint8: torch.Tensor, draws: PolicyDraws):
    """(rows, float chunk on the 0-255 scale) of the batch: crop, flip, then the drawn ops in order."""
    b, _, h, w = x_uint8.shape
    chunk = max(1, _CHUNK_PIXELS // (h * w))
    flips, ops, values = draws.flip.tolist(), draws.op.tolist(), draws.magnitude.tolist()
    for start in range(0, b, chunk):
        rows = slice(start, min(start + chunk, b))
        x = (resized_crop(x_uint8[rows], draws.box[rows]) if draws.crop else x_uint8[rows]).float()
        for i in range(rows.stop - rows.start):
            if flips[start + i]:
                x[i] = x[i].flip(-1)
        for k in range(draws.op.shape[1]):
            geometric = [i for i in range(len(x)) if OPS[ops[start + i][k]] in GEOMETRIC]
            if geometric:
                index = torch.tensor(geometric, device=x.device)
                x[index] = _affine_nearest(x[index], [_geometric_matrix(OPS[ops[start + i][k]], values[start + i][k], h, w)
                                                      for i in geometric])
            for i in range(len(x)):
                name = OPS[ops[start + i][k]]
                if name in _PER_IMAGE:
                    image = x[i]
                    result = _PER_IMAGE[name](image, values[start + i][k])
                    if result.data_ptr() != image.data_ptr():  # most ops work in place: no copy back
                        image.copy_(result)
        yield rows, x


def augment_uint8(x_uint8: torch.Tensor, draws: PolicyDraws) -> torch.Tensor:
    """Crop, flip and the drawn ops on a uint8 batch [B, C, H, W]; uint8 out, as torchvision's chain."""
    out = torch.empty_like(x_uint8)
    for rows, x in _augmented_chunks(x_uint8, draws):
        out[rows] = x.to(torch.uint8)
    return out


def apply_policy(
    x_uint8: torch.Tensor,
    draws: PolicyDraws,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """`augment_uint8`, then ToTensor + Normalize: float32 [B, 3, H, W] in `memory_format`. The seed
    policy: the crop, then harv_train/core/augment.py's flip, rotation, jitter and normalization."""
    if draws.seed is not None:
        x = resized_crop(x_uint8, draws.box) if draws.crop else x_uint8
        return apply_augmentation(x, draws.seed, mean, std, memory_format)
    out = torch.empty(x_uint8.shape, dtype=torch.float32, device=x_uint8.device, memory_format=memory_format)
    for rows, x in _augmented_chunks(x_uint8, draws):  # normalized while in cache, written in the output's layout
        _normalize_(x, mean, std)
        out[rows] = x
    return out
