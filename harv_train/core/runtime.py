"""Device, threads and seeds: the process-level settings a run depends on."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from harv_train.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {name} but no CUDA device is available: set device: auto or cpu")
    return device


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(threads: int) -> int:
    """Use `threads` compute threads (0: every core this process may run on)."""
    n = threads or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's randomness depends only on (seed, epoch): a resumed run draws what it would have."""
    return (seed * 1_000_003 + epoch) % 2**63
