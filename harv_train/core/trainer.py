"""A training run as a sequence of restartable steps that talk through checkpoint files.

`start_run` writes epoch 0 (the pretrained, frozen model) to `last.pth`; `run_epoch(cfg, epoch)`
loads `last.pth`, trains one epoch, and writes `last.pth` (and `best_model.pth` on a new best);
`finish_run` copies the last state to `final_model.pth`. Every step restores what it needs from disk
on entry, so a retried or resumed step redoes exactly the lost work and nothing else. Each epoch's
randomness depends only on (seed, epoch), so a resumed run computes what an uninterrupted one would.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from harv_train.core import checkpoints as ckpt
from harv_train.config import TrainConfig, flatten
from harv_train.core.data import DecodedSplit, load_dataset
from harv_train.core.early_stopping import EarlyStopping
from harv_train.core.engine import SINGLE, Pipeline, World, evaluate, frozen_feature_batches, train_one_epoch
from harv_train.errors import CheckpointError, UserError
from harv_train.core.freezing import (
    forward_from,
    freeze_early_blocks,
    frozen_block_count,
    fused_frozen_prefix,
    trainable_parameters,
)
from harv_train.core.models import build_architecture, build_model, format_parameter_counts, model_spec, resolve_weights_file
from harv_train.core.runtime import available_cores, configure_threads, epoch_seed, resolve_device, seed_everything

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def load_data(cfg: TrainConfig, log: Log = print) -> dict[str, DecodedSplit]:
    spec = model_spec(cfg.model_name)
    return load_dataset(
        cfg.data_dir, cfg.classes, cfg.img_size, spec.interpolation, cfg.cache_max_mb, cfg.skip_bad_images, log
    )


def describe_data(splits: dict[str, DecodedSplit]) -> dict[str, Any]:
    """A small, JSON-able summary: what the flow passes on and logs."""
    return {
        "classes": splits["train"].classes,
        "train_images": len(splits["train"]),
        "val_images": len(splits["val"]),
        "train_counts": _counts(splits["train"]),
        "val_counts": _counts(splits["val"]),
        "skipped_images": splits["train"].skipped + splits["val"].skipped,
        "cached": splits["train"].cached and splits["val"].cached,
    }


def _counts(split: DecodedSplit) -> dict[str, int]:
    counts = torch.bincount(split.labels, minlength=len(split.classes)).tolist()
    return dict(zip(split.classes, counts))


def build_optimizer(cfg: TrainConfig, model: nn.Module, state: dict | None = None) -> torch.optim.Optimizer:
    """Adam over the trainable parameters only (its weight decay would otherwise still shrink frozen
    weights), in its fused implementation where the parameters' device has one: the same update, one
    kernel over all weights instead of a loop per tensor (a quarter of the step time on CPU here)."""
    params = trainable_parameters(model)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if state is not None:
        # A loaded group would keep the implementation flag it was saved with; loading with this one
        # also puts Adam's step counters where the fused kernel wants them.
        optimizer.load_state_dict({**state, "param_groups": [{**g, "fused": fused} for g in state["param_groups"]]})
    return optimizer


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
    )


def _pipeline(cfg: TrainConfig) -> Pipeline:
    spec = model_spec(cfg.model_name)
    return Pipeline(
        mean=spec.mean,
        std=spec.std,
        device=resolve_device(cfg.device),
        channels_last=cfg.channels_last,
        num_workers=cfg.num_workers,
    )


def checkpoint_path(cfg: TrainConfig, name: str) -> Path:
    return cfg.checkpoints_dir / name


def start_run(cfg: TrainConfig, classes: list[str], mlflow_run_id: str | None, log: Log = print) -> dict[str, Any]:
    """Build the pretrained model, freeze it, and write it as epoch 0 to last.pth."""
    seed_everything(cfg.seed)  # fixes the new head's initialisation
    model = build_model(cfg.model_name, len(classes), cfg.pretrained, cfg.weights_path)
    n_frozen = frozen_block_count(model, cfg.freeze_ratio)
    freeze_early_blocks(model, n_frozen)
    log(f"Model: {cfg.model_name} ({'ImageNet-pretrained' if cfg.pretrained or cfg.weights_path else 'random init'}), "
        f"{n_frozen} of {len(model.features)} feature blocks frozen")
    log(format_parameter_counts(model))
    optimizer = build_optimizer(cfg, model)
    spec = model_spec(cfg.model_name)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": _scheduler(cfg, optimizer).state_dict(),
        "early_stopping": EarlyStopping(cfg.early_stopping_patience).state_dict(),
        "epoch": 0,
        "best_val_acc": -1.0,
        "best_epoch": 0,
        "classes": list(classes),
        "params": cfg.to_dict(),
        "model_name": cfg.model_name,
        "n_frozen": n_frozen,
        "img_size": cfg.img_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": spec.interpolation,
        "history": [],
        "mlflow_run_id": mlflow_run_id,
        "run_uid": uuid.uuid4().hex,
        "stopped_early": False,
    }
    ckpt.save_checkpoint(state, checkpoint_path(cfg, ckpt.LAST))
    return _summary(state)


def _summary(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": state["epoch"],
        "best_val_acc": state["best_val_acc"],
        "best_epoch": state["best_epoch"],
        "mlflow_run_id": state.get("mlflow_run_id"),
        "history": state["history"],
        "stopped_early": state.get("stopped_early", False),
    }


def check_resumable(cfg: TrainConfig, state: dict[str, Any], classes: list[str], path: Path) -> None:
    """A checkpoint only resumes the run it came from: same model, classes, image size and freezing."""
    theirs = (state["model_name"], list(state["classes"]), state["img_size"], state["params"]["freeze_ratio"])
    ours = (cfg.model_name, list(classes), cfg.img_size, cfg.freeze_ratio)
    if theirs != ours:
        raise CheckpointError(
            f"{path} was trained as {theirs[0]} on classes {theirs[1]} at {theirs[2]}px, freeze_ratio {theirs[3]}; "
            f"this run is {ours[0]} on {ours[1]} at {ours[2]}px, freeze_ratio {ours[3]}: resume with the same "
            "params, or start without --resume (or with another artifacts_dir)"
        )


def resume_run(cfg: TrainConfig, classes: list[str], log: Log = print) -> dict[str, Any]:
    path = checkpoint_path(cfg, ckpt.LAST)
    if not path.is_file():
        raise CheckpointError(
            f"--resume: no checkpoint at {path}: run without --resume to start, or set artifacts_dir to the earlier run's"
        )
    ckpt.remove_stale_temporaries(cfg.checkpoints_dir)  # a write that a kill interrupted
    state = ckpt.load_checkpoint(path)
    check_resumable(cfg, state, classes, path)
    log(f"Resuming from {path}: {state['epoch']} epoch(s) done, best val accuracy {max(state['best_val_acc'], 0):.4f}")
    changed = changed_params(state["params"], cfg.to_dict())
    if changed:  # allowed (more epochs, another lr), but worth seeing: e.g. another registered model
        log("Params differ from the run being resumed: " + ", ".join(changed))
    return _summary(state)


def changed_params(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key old -> new` for every param (nested sections dotted) whose value differs."""
    old, new = flatten(before), flatten(now)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


class _Session:
    """What one process keeps between epochs of the same run: the model object, the frozen features
    of the validation set, and the state it last wrote to last.pth. Weights always come from
    last.pth: from the file, or from memory while the file is still exactly what was written."""

    def __init__(self, run_uid: str, model: nn.Module):
        self.run_uid = run_uid
        self.model = model
        self.prefix: nn.Module | None = None  # the frozen blocks, BatchNorm folded (built once per run)
        self.val_split: DecodedSplit | None = None  # the split val_features were computed from
        self.val_features: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._written: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    def wrote(self, path: Path, state: dict[str, Any]) -> None:
        self._written = (_file_identity(path), state)

    def take_written(self, path: Path) -> dict[str, Any] | None:
        """The state last written to `path` if the file is still that write, once: its tensors are the
        live weights and Adam moments, which the epoch about to start changes."""
        written, self._written = self._written, None
        return written[1] if written and written[0] == _file_identity(path) else None


def _file_identity(path: Path) -> tuple[int, int, int]:
    # Every checkpoint write is a new file renamed into place: a new inode and modification time.
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load_last(path: Path) -> dict[str, Any]:
    """last.pth's state; skips reading the whole file (about 0.04 s of each 2 s epoch here) when this
    process wrote it and nothing has replaced it since."""
    state = _session.take_written(path) if _session is not None and path.is_file() else None
    return state if state is not None else ckpt.load_checkpoint(path)


_session: _Session | None = None


def _session_for(cfg: TrainConfig, state: dict[str, Any], pipeline: Pipeline) -> _Session:
    global _session
    if _session is None or _session.run_uid != state["run_uid"]:
        model = build_architecture(cfg.model_name, len(state["classes"]))
        freeze_early_blocks(model, state["n_frozen"])
        model.to(pipeline.device)
        if pipeline.channels_last:
            model.to(memory_format=torch.channels_last)
        _session = _Session(state["run_uid"], model)
    return _session


def _collect_val_features(session: _Session, batches, cache_max_mb: int):
    """Pass the batches through, keeping them for later epochs while they fit in cache_max_mb."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
    used = 0
    for features, labels in batches:
        used += features.numel() * features.element_size()
        if kept is not None and used <= cache_max_mb * 2**20:
            kept.append((features, labels))
        else:
            kept = None
        yield features, labels
    if kept is not None:
        session.val_features = kept


class _TrainablePart(nn.Module):
    """The network after the frozen prefix, as one module: what DistributedDataParallel wraps. Its
    frozen parameters do not require grad, so DDP leaves them out of its gradient buckets and every
    parameter it does reduce receives a gradient each step (no find_unused_parameters needed)."""

    def __init__(self, model: nn.Module, n_frozen: int):
        super().__init__()
        self.model, self.n_frozen = model, n_frozen

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return forward_from(self.model, self.n_frozen, h)


def run_epoch(
    cfg: TrainConfig, epoch: int, log: Log = print, progress: bool = True, world: World = SINGLE
) -> dict[str, Any]:
    """Train epoch `epoch` (0-based) from last.pth and write its result. Idempotent: an epoch that
    last.pth already contains is not trained again. Under torchrun (`world.size` > 1) every rank
    runs this; only rank 0 logs and writes checkpoints."""
    if world.rank != 0:
        log = _quiet
    if not cfg.threads and world.size > 1:
        configure_threads(max(1, available_cores() // cfg.distributed.nproc_per_node))
    else:
        configure_threads(cfg.threads)
    last_path = checkpoint_path(cfg, ckpt.LAST)
    state = _load_last(last_path)
    if state["epoch"] > epoch:
        return {**state["history"][epoch], "skipped": True}
    if state["epoch"] != epoch:
        raise CheckpointError(f"{last_path} holds {state['epoch']} epochs, cannot train epoch {epoch + 1}: resume instead")

    pipeline = _pipeline(cfg)
    splits = load_data(cfg, log)
    session = _session_for(cfg, state, pipeline)
    model, n_frozen = session.model, state["n_frozen"]
    model.load_state_dict(state["model"])
    if session.prefix is None and n_frozen:
        session.prefix = fused_frozen_prefix(model, n_frozen)
    optimizer = build_optimizer(cfg, model, state["optimizer"])
    scheduler = _scheduler(cfg, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    stopper = EarlyStopping(cfg.early_stopping_patience)
    stopper.load_state_dict(state["early_stopping"])
    scaler = torch.amp.GradScaler("cuda") if pipeline.device.type == "cuda" else None
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])

    seed = epoch_seed(cfg.seed, epoch)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation
    lr = optimizer.param_groups[0]["lr"]
    trainable = None
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [pipeline.device.index] if pipeline.device.type == "cuda" else None
        trainable = DistributedDataParallel(_TrainablePart(model, n_frozen), device_ids=device_ids)
    train = train_one_epoch(model, n_frozen, optimizer, splits["train"], cfg.batch_size, pipeline, generator,
                            scaler, progress and world.rank == 0, world, trainable, session.prefix)

    val_start = time.perf_counter()
    if session.val_split is not splits["val"]:  # the files changed since: their features too
        session.val_split, session.val_features = splits["val"], None
    features = session.val_features or _collect_val_features(
        session, frozen_feature_batches(model, n_frozen, splits["val"], cfg.batch_size, pipeline, world, session.prefix),
        cfg.cache_max_mb,
    )
    val = evaluate(model, n_frozen, features, world)
    val.seconds = time.perf_counter() - val_start  # includes the frozen features when computed this epoch

    scheduler.step(val.loss)
    is_best = stopper.step(val.acc, val.loss)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": train.loss,
        "train_acc": train.acc,
        "val_loss": val.loss,
        "val_acc": val.acc,
        "lr": lr,
        "train_time_s": train.seconds,
        "val_time_s": val.seconds,
        "train_batches": train.batches,
        "val_batches": val.batches,
        "is_best": is_best,
    }
    log(f"Epoch {epoch + 1}/{cfg.epochs}")
    log(f"Train: loss={train.loss:.4f}, accuracy={train.acc:.4f} ({train.batches} batches, {train.seconds:.1f}s)")
    log(f"Val: loss={val.loss:.4f}, accuracy={val.acc:.4f} ({val.batches} batches, {val.seconds:.1f}s)")

    new_state = {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "early_stopping": stopper.state_dict(),
        "epoch": epoch + 1,
        "history": state["history"] + [metrics],
        "stopped_early": stopper.should_stop,
    }
    if scaler is not None:
        new_state["scaler"] = scaler.state_dict()
    if is_best:
        new_state["best_val_acc"] = val.acc
        new_state["best_epoch"] = epoch + 1
    if world.rank == 0:
        if is_best:
            # best before last: a crash in between re-runs this epoch, which rewrites the same best.
            ckpt.save_checkpoint(new_state, checkpoint_path(cfg, ckpt.BEST))
            log(f"New best model: val accuracy {val.acc:.4f} (loss {val.loss:.4f}) at epoch {epoch + 1} -> "
                f"{checkpoint_path(cfg, ckpt.BEST)}")
        ckpt.save_checkpoint(new_state, last_path)
        session.wrote(last_path, new_state)
    if stopper.should_stop:
        log(f"Early stopping: no better model (val accuracy, then val loss) for {cfg.early_stopping_patience} epochs")
    return {**metrics, "stop": stopper.should_stop}


def finish_run(cfg: TrainConfig) -> dict[str, Any]:
    """final_model.pth is the last epoch's state; returns the run's summary."""
    state = ckpt.load_checkpoint(checkpoint_path(cfg, ckpt.LAST))
    ckpt.save_checkpoint(state, checkpoint_path(cfg, ckpt.FINAL))
    return _summary(state)


def archive_previous_checkpoints(cfg: TrainConfig, log: Log = print) -> Path | None:
    """A fresh run never overwrites an earlier run's checkpoints: they move aside, whole, named by
    when that run last wrote one (not the folder's time: write checks touch it), with the
    evaluation report and export made from them."""
    directory = cfg.checkpoints_dir
    checkpoints = list(directory.glob("*.pth")) if directory.is_dir() else []
    if not checkpoints:
        return None
    written = max(path.stat().st_mtime for path in checkpoints)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(written))
    target = directory.with_name(f"checkpoints-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"checkpoints-{stamp}-{n}")
    directory.rename(target)
    for made_from_them in (cfg.eval_dir, cfg.export_dir):
        if made_from_them.is_dir():
            made_from_them.rename(target / made_from_them.name)
    log(f"Kept the earlier run's checkpoints in {target}")
    return target


def load_model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """An nn.Module in eval mode with a checkpoint's weights (for logging, evaluation, export)."""
    model = build_architecture(state["model_name"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval()


def input_example(state: dict[str, Any]) -> "np.ndarray":
    """One normalized all-grey image at the checkpoint's size: MLflow's signature and example."""
    import numpy as np

    return np.zeros((1, 3, state["img_size"], state["img_size"]), dtype=np.float32)


def previous_mlflow_run_id(cfg: TrainConfig) -> str | None:
    path = checkpoint_path(cfg, ckpt.LAST)
    return ckpt.load_checkpoint(path).get("mlflow_run_id") if path.is_file() else None


def check_inputs(cfg: TrainConfig, resume: bool, log: Log = print) -> dict[str, Any]:
    """Everything about the inputs that can be checked before training starts; raises UserError."""
    resolve_device(cfg.device)
    splits = load_data(cfg, log)
    classes = splits["train"].classes
    if cfg.pretrained or cfg.weights_path:
        resolve_weights_file(cfg.model_name, cfg.weights_path)
    if resume:
        resume_run(cfg, classes, _quiet)
    check_writable(cfg.checkpoints_dir)
    check_free_space(cfg.checkpoints_dir, estimated_checkpoint_bytes(cfg, len(classes)) * 4)
    return describe_data(splits)


def estimated_checkpoint_bytes(cfg: TrainConfig, num_classes: int) -> int:
    """Weights plus Adam's two moments for every trainable weight, in float32."""
    model = build_architecture(cfg.model_name, num_classes)
    freeze_early_blocks(model, frozen_block_count(model, cfg.freeze_ratio))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model))
    buffers = sum(b.numel() for b in model.buffers())
    return 4 * (total + buffers + 2 * trainable)


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
