"""An exponential moving average of the trainable weights (`ema_decay`), as timm's ModelEma keeps.

After every optimizer step the average moves towards the live weights:
`avg = d * avg + (1 - d) * live`, with `d = min(ema_decay, (1 + n) / (10 + n))` at update n. The warmup
(TensorFlow's `ExponentialMovingAverage(num_updates=...)` rule) matters here: a few hundred images make
a few dozen steps a run, and a plain 0.999 would keep the average at the pretrained weights.

Only the trainable part is averaged: the frozen prefix never changes. BatchNorm running statistics
of the trainable blocks are averaged too (timm averages buffers as well); the step counters are not.
Validation, best_model.pth and everything served from it use the averaged weights; the live weights
go on training and are kept in the checkpoint for resume (`RunState`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from harv_train.core.freezing import feature_blocks


def averaged_names(model: nn.Module, n_frozen: int) -> list[str]:
    """The state_dict keys the average covers: every float tensor outside the frozen prefix."""
    frozen = {id(t) for block in feature_blocks(model)[:n_frozen] for t in (*block.parameters(), *block.buffers())}
    state = model.state_dict(keep_vars=True)
    return [k for k, t in state.items() if id(t) not in frozen and t.is_floating_point()]


class WeightEma:
    """The average of `model`'s trainable part; `model` keeps the live weights."""

    def __init__(self, model: nn.Module, n_frozen: int, decay: float):
        self.decay = decay
        self.names = averaged_names(model, n_frozen)
        state = model.state_dict()
        self.average = {k: state[k].detach().clone() for k in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        averages = list(self.average.values())
        torch._foreach_lerp_(averages, [live[k].detach() for k in self.names], 1 - d)
        self.updates += 1

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """`model` holds the averaged weights inside the block, its live ones again after it."""
        live = {k: t.detach().clone() for k, t in model.state_dict().items() if k in self.average}
        model.load_state_dict(self.average, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(live, strict=False)

    def state_dict(self) -> dict:
        return {"average": {k: t.clone() for k, t in self.average.items()}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["average"]) ^ set(self.names)
        if unknown:
            raise ValueError(f"the saved weight average covers other weights ({sorted(unknown)[:3]} ...)")
        self.average = {k: state["average"][k].to(self.average[k]) for k in self.names}
        self.updates = int(state["updates"])
