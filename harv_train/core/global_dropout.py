"""Dropout and stochastic-depth masks drawn for the global batch in a data-parallel run.

Every rank seeds torch alike for an epoch, so a plain nn.Dropout on each rank draws the mask of its own
8 rows from the same random stream: rank 0 and rank 1 drop the same pattern, and neither draws what one
process would for the 16 images of the global batch. Here each rank draws the mask of the whole global
batch (the shape one process draws, from the same stream) and keeps the rows of its own samples, the
ones `engine.train_one_epoch` gives it (every world-th sample of the global batch). On the CPU that is
exactly one process's mask (nn.Dropout and torchvision's stochastic_depth draw with `bernoulli_` on a
tensor of the batch's shape); on CUDA, where nn.Dropout has a fused kernel of its own, it is a mask of
the same distribution. Neither layer has parameters or buffers: the state dict does not change.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import StochasticDepth


def _global_rows(shape: tuple[int, ...], keep: float, like: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a mask drawn for `world` ranks' rows (scaled by 1/keep, as dropout scales)."""
    mask = torch.empty((shape[0] * world, *shape[1:]), dtype=like.dtype, device=like.device).bernoulli_(keep)
    if keep > 0:
        mask.div_(keep)
    return mask[rank::world]


class GlobalDropout(nn.Dropout):
    """nn.Dropout whose mask is this rank's rows of the global batch's mask."""

    def __init__(self, p: float, rank: int, world: int):
        super().__init__(p)
        self.rank, self.world = rank, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * _global_rows(tuple(x.shape), 1 - self.p, x, self.rank, self.world)


class GlobalStochasticDepth(StochasticDepth):
    """torchvision's StochasticDepth ("row" mode: a whole sample's residual branch dropped) with the
    global batch's draws."""

    def __init__(self, p: float, rank: int, world: int):
        super().__init__(p, "row")
        self.rank, self.world = rank, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * _global_rows((x.shape[0],) + (1,) * (x.dim() - 1), 1 - self.p, x, self.rank, self.world)


def draw_global_masks(module: nn.Module, rank: int, world: int) -> int:
    """Replace the nn.Dropout and row-mode StochasticDepth layers under `module` (in place) with their
    global-batch versions; returns how many. Idempotent."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, (GlobalDropout, GlobalStochasticDepth)):
            continue
        if type(child) is nn.Dropout:
            setattr(module, name, GlobalDropout(child.p, rank, world).train(child.training))
            replaced += 1
        elif type(child) is StochasticDepth and child.mode == "row":
            setattr(module, name, GlobalStochasticDepth(child.p, rank, world).train(child.training))
            replaced += 1
        else:
            replaced += draw_global_masks(child, rank, world)
    return replaced
