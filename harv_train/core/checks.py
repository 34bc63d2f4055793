"""What can be checked about a run's inputs before anything is written; each failure is a UserError."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from harv_train.config import TrainConfig, flatten
from harv_train.core import checkpoints as ckpt
from harv_train.core.data import check_images_open, scan_dataset
from harv_train.core.freezing import freeze_early_blocks, frozen_block_count, trainable_parameters
from harv_train.core.models import build_architecture, resolve_weights_file
from harv_train.core.runtime import resolve_device
from harv_train.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)


def check_inputs(cfg: TrainConfig, resume: bool, classes: list[str] | None = None) -> list[str]:
    """Device, data layout, weights, the checkpoint to resume, and room to write; returns the classes.
    `classes`: those of the decoded data when the caller has it; else the folders are scanned and
    every image's header read (decoding them all twice would double a large dataset's start)."""
    resolve_device(cfg.device)
    if classes is None:
        indexes = scan_dataset(cfg.data_dir, cfg.classes, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        if not cfg.skip_bad_images:
            for index in indexes.values():
                check_images_open(index)
        classes = indexes["train"].classes
    if cfg.pretrained or cfg.weights_path:
        resolve_weights_file(cfg.model_name, cfg.weights_path)
    if resume:
        check_resumable(cfg, classes)
    check_writable(cfg.checkpoints_dir)
    check_free_space(cfg.checkpoints_dir, estimated_checkpoint_bytes(cfg, len(classes)) * 4)
    return classes


def check_resumable(cfg: TrainConfig, classes: list[str]) -> dict[str, Any]:
    """last.pth exists and was trained as this run is (model, classes, image size, freezing); returns it."""
    path = cfg.checkpoints_dir / ckpt.LAST
    if not path.is_file():
        raise CheckpointError(
            f"--resume: no checkpoint at {path}: run without --resume to start, or set artifacts_dir to the earlier run's"
        )
    state = ckpt.load_checkpoint(path)
    theirs = (state["model_name"], list(state["classes"]), state["img_size"], state["params"]["freeze_ratio"])
    ours = (cfg.model_name, list(classes), cfg.img_size, cfg.freeze_ratio)
    if theirs != ours:
        raise CheckpointError(
            f"{path} was trained as {theirs[0]} on classes {theirs[1]} at {theirs[2]}px, freeze_ratio {theirs[3]}; "
            f"this run is {ours[0]} on {ours[1]} at {ours[2]}px, freeze_ratio {ours[3]}: resume with the same "
            "params, or start without --resume (or with another artifacts_dir)"
        )
    # What shapes the optimizer's and scheduler's saved state (issue 14): another value could not load it.
    saved = state["params"]
    for key, same in (("backbone_lr_mult", lambda a, b: (a == 1.0) == (b == 1.0)), ("schedule", lambda a, b: a == b)):
        default = TrainConfig.model_fields[key].default
        if not same(saved.get(key, default), getattr(cfg, key)):
            raise CheckpointError(
                f"{path} was trained with {key} {saved.get(key, default)}, this run has {getattr(cfg, key)}: its "
                f"optimizer and scheduler state would not fit; resume with {key} {saved.get(key, default)}, or start "
                "without --resume (or with another artifacts_dir)"
            )
    return state


def changed_params(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key old -> new` for every param (nested sections dotted) whose value differs."""
    old, new = flatten(before), flatten(now)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def estimated_checkpoint_bytes(cfg: TrainConfig, num_classes: int) -> int:
    """Weights plus Adam's two moments for every trainable weight (the most `unfreeze` trains), and with
    `ema_decay` the live copy of those weights, in float32."""
    model = build_architecture(cfg.model_name, num_classes)
    freeze_early_blocks(model, frozen_block_count(model, min([cfg.freeze_ratio, *cfg.unfreeze.values()])))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    buffers = sum(b.numel() for b in model.buffers())
    return 4 * (total + buffers + (3 if cfg.ema_decay else 2) * trainable)


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Refuse to start a run whose checkpoints (last, best, final and one being written) cannot fit."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise UserError(
            f"not enough free disk space in {directory}: {free / 2**20:.0f} MiB free, checkpoints need about "
            f"{needed_bytes / 2**20:.0f} MiB: free some space or set artifacts_dir to another disk"
        )


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {directory} ({exc.strerror}): free disk space or choose a writable artifacts_dir") from None
