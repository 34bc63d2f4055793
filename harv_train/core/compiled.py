"""`compile: true`: the trainable part of the network through torch.compile (inductor).

- Inductor keeps its compiled kernels and graphs on disk, in `CACHE_DIR/inductor` (the
  `TORCHINDUCTOR_CACHE_DIR` it reads, unless the environment already sets one): a second run of the same
  network compiles from there, faster than the first.
- `fallback_random`: dropout draws the same random numbers as in eager mode, so a compiled run trains
  what an eager run does, to float rounding (tests/test_compile.py).
- `dynamic=False`: one graph per batch size (the full batch and the epoch's shorter last one), each
  specialised, rather than one slower dynamic-shape graph.
Only the training step is compiled; validation runs the trainable part on cached frozen features and
costs too little to pay for a second graph. The measured compile time and its break-even are in
docs/data-at-scale.md.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from harv_train.core.decoded_cache import resolve_cache_dir


def inductor_cache_dir(cache_dir: str | None) -> str:
    return str(resolve_cache_dir(cache_dir) / "inductor")


def compile_trainable(part: nn.Module, cache_dir: str | None) -> nn.Module:
    """`part` compiled (lazily: the first call compiles), its kernels cached under `cache_dir`."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir(cache_dir))
    return torch.compile(part, dynamic=False, options={"fallback_random": True})
