"""A training run's live state, and the typed results its steps hand on.

`RunState` owns what training changes: the model, the optimizer, the learning-rate scheduler, early
stopping, the fp16 grad scaler and the history of epochs. `RunState.new` builds epoch 0 (the
pretrained, frozen model); `RunState.restore` rebuilds it from a checkpoint; `commit` writes it
back, best before last. A checkpoint is a plain dict of tensors, numbers, strings and lists, so it
loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harv_train.config import TrainConfig
from harv_train.core import checkpoints as ckpt
from harv_train.core.early_stopping import EarlyStopping
from harv_train.core.ema import WeightEma
from harv_train.core.engine import CUDA_AUTOCAST_DTYPE
from harv_train.core.freezing import feature_blocks, freeze_early_blocks, frozen_block_count, trainable_parameters
from harv_train.core.models import build_architecture, build_model, family_of, format_parameter_counts, model_spec
from harv_train.core.runtime import seed_everything

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochMetrics:
    """One finished epoch. Every field is always there: `stop` says whether early stopping ends the run."""

    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    train_time_s: float
    val_time_s: float
    train_batches: int
    val_batches: int
    is_best: bool
    stop: bool = False
    val_macro_f1: float = 0.0  # 0.0 in checkpoints written before it was computed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EpochMetrics":
        """From a checkpoint's history; entries written before `stop` existed did not stop the run."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# What MLflow gets per epoch (step = epoch).
LOGGED_EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "lr", "train_time_s",
                        "val_time_s")


@dataclass(frozen=True)
class RunSummary:
    """Where a run stands: what the flow passes on, logs and returns."""

    epoch: int  # epochs completed
    best_val_acc: float
    best_epoch: int
    mlflow_run_id: str | None
    history: tuple[EpochMetrics, ...]
    stopped_early: bool

    def best_score(self, select_metric: str) -> float:
        """The best epoch's value of `select_metric` (val_acc or val_macro_f1): what the champion is compared on."""
        if select_metric == "val_acc" or not self.best_epoch:
            return self.best_val_acc
        return self.history[self.best_epoch - 1].val_macro_f1


def build_optimizer(cfg: TrainConfig, model: nn.Module, state: dict | None = None) -> torch.optim.Optimizer:
    """Adam over the trainable parameters only (its weight decay would otherwise still shrink frozen
    weights), in its fused implementation where the parameters' device has one: the same update, one
    kernel over all weights instead of a loop per tensor (a quarter of the step time on CPU)."""
    params = trainable_parameters(model)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.Adam(_param_groups(cfg, model, params), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=fused)
    if state is not None:
        # A loaded group would keep the implementation flag it was saved with; loading with this one
        # also puts Adam's step counters where the fused kernel wants them.
        optimizer.load_state_dict({**state, "param_groups": [{**g, "fused": fused} for g in state["param_groups"]]})
    return optimizer


def _param_groups(cfg: TrainConfig, model: nn.Module, params: list[nn.Parameter]) -> list:
    """One group (the seed's), or with backbone_lr_mult != 1 the head first (its lr is the one logged)
    and the trainable backbone stages at lr x backbone_lr_mult."""
    if cfg.backbone_lr_mult == 1.0:
        return params
    in_stages = {id(p) for p in feature_blocks(model).parameters()}
    head = [p for p in params if id(p) not in in_stages]
    backbone = [p for p in params if id(p) in in_stages]
    groups = [{"params": head, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult}]
    return [g for g in groups if g["params"]]


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """plateau (the seed's): ReduceLROnPlateau on val loss. cosine: `warmup_epochs` of linear warmup,
    then cosine decay over the remaining epochs, stepped once per epoch (`step_scheduler`)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cosine_factor(e, cfg.epochs, cfg.warmup_epochs))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr
    )


def cosine_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The lr of 0-based `epoch` as a fraction of lr: (e + 1) / (warmup + 1) while warming up, then
    half a cosine from 1 towards 0 that the last epoch does not reach."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


def step_scheduler(scheduler, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


class RunState:
    """The live state of one run, on one device. Built by `new` or `restore`, written by `commit`."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, checkpoint: dict[str, Any], device: torch.device):
        self.cfg = cfg
        self.model = model
        self.n_frozen: int = checkpoint["n_frozen"]
        self.optimizer = build_optimizer(cfg, model, checkpoint["optimizer"])
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Building an epoch-stepped scheduler set the lrs of its epoch 0: put back those of the
            # epoch the checkpoint is at.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        self.ema = _weight_average(cfg, model, self.n_frozen, checkpoint.get("ema"))
        self.stopper = EarlyStopping(cfg.early_stopping_patience)
        self.stopper.load_state_dict(checkpoint["early_stopping"])
        # float16 autocast needs loss scaling against underflowing gradients; bfloat16 does not.
        fp16 = device.type == "cuda" and CUDA_AUTOCAST_DTYPE == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        if self.scaler is not None and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch: int = checkpoint["epoch"]
        self.best_val_acc: float = checkpoint["best_val_acc"]
        self.best_epoch: int = checkpoint.get("best_epoch", 0)
        self.history = [EpochMetrics.from_dict(m) for m in checkpoint["history"]]
        self.stopped_early: bool = checkpoint.get("stopped_early", False)
        # What identifies the run and how to read its images: copied into every checkpoint as is.
        self.identity = {k: checkpoint[k] for k in IDENTITY_KEYS if k in checkpoint}

    @classmethod
    def new(cls, cfg: TrainConfig, classes: list[str], mlflow_run_id: str | None, device: torch.device) -> "RunState":
        """Epoch 0: the pretrained model with a fresh head (seeded) and its early blocks frozen."""
        seed_everything(cfg.seed)  # fixes the new head's initialisation
        model = build_model(cfg.model_name, len(classes), cfg.pretrained, cfg.weights_path)
        n_frozen = frozen_block_count(model, cfg.freeze_ratio)
        freeze_early_blocks(model, n_frozen)
        logger.info(f"Model: {cfg.model_name} ({'ImageNet-pretrained' if cfg.pretrained or cfg.weights_path else 'random init'}), "
                    f"{n_frozen} of {len(feature_blocks(model))} stages frozen ({family_of(model).unit})")
        logger.info(format_parameter_counts(model))
        optimizer = build_optimizer(cfg, model)
        spec = model_spec(cfg.model_name)
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": build_scheduler(cfg, optimizer).state_dict(),
            "early_stopping": EarlyStopping(cfg.early_stopping_patience).state_dict(),
            "epoch": 0,
            "best_val_acc": -1.0,
            "best_epoch": 0,
            "history": [],
            "stopped_early": False,
            "classes": list(classes),
            "params": cfg.to_dict(),
            "model_name": cfg.model_name,
            "n_frozen": n_frozen,
            "img_size": cfg.img_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
            "mlflow_run_id": mlflow_run_id,
            "run_uid": uuid.uuid4().hex,
        }
        return cls(cfg, _placed(model, device, cfg.channels_last), checkpoint, device)

    @classmethod
    def restore(cls, cfg: TrainConfig, path: Path, device: torch.device) -> "RunState":
        """The run as `path` holds it; the optimizer and scheduler take this config's settings."""
        checkpoint = ckpt.load_checkpoint(path)
        model = build_architecture(checkpoint["model_name"], len(checkpoint["classes"]))
        freeze_early_blocks(model, checkpoint["n_frozen"])
        model.load_state_dict(checkpoint["model"])
        return cls(cfg, _placed(model, device, cfg.channels_last), checkpoint, device)

    @property
    def classes(self) -> list[str]:
        return list(self.identity["classes"])

    @property
    def mlflow_run_id(self) -> str | None:
        return self.identity.get("mlflow_run_id")

    @property
    def run_uid(self) -> str:
        return self.identity["run_uid"]

    def unfreeze(self, n_frozen: int) -> None:
        """Train blocks `n_frozen`.. as well from now on (staged unfreezing, `unfreeze`), as Lightning's
        BackboneFinetuning does: the optimizer keeps the Adam moments of what already trained and its
        groups' current learning rates; the newly trainable blocks join the backbone's group (lr x
        backbone_lr_mult) with fresh moments; the schedule goes on where it is; the weight average starts
        averaging them from their current (pretrained) values."""
        old_optimizer, old_scheduler = self.optimizer, self.scheduler
        moments = {id(p): old_optimizer.state[p] for g in old_optimizer.param_groups for p in g["params"]
                   if p in old_optimizer.state}
        head = old_optimizer.param_groups[0]
        progress = head["lr"] / head.get("initial_lr", self.cfg.lr)  # where the schedule has taken the lr
        freeze_early_blocks(self.model, n_frozen)
        self.optimizer = build_optimizer(self.cfg, self.model)  # groups at lr and lr x backbone_lr_mult
        bases = [g["lr"] for g in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in moments:
                    self.optimizer.state[p] = moments[id(p)]
        self.scheduler = build_scheduler(self.cfg, self.optimizer)
        current = [base * progress for base in bases]
        saved = {**old_scheduler.state_dict(), "_last_lr": current}
        if "base_lrs" in saved:  # cosine (LambdaLR): a base lr per group
            saved["base_lrs"] = bases
        if "min_lrs" in saved:  # plateau: a floor per group
            saved["min_lrs"] = [self.cfg.min_lr] * len(bases)
        self.scheduler.load_state_dict(saved)
        for group, lr in zip(self.optimizer.param_groups, current):
            group["lr"] = lr
        if self.ema is not None:
            average = WeightEma(self.model, n_frozen, self.ema.decay)
            average.average.update({k: t for k, t in self.ema.average.items() if k in average.average})
            average.updates = self.ema.updates
            self.ema = average
        self.n_frozen = n_frozen
        self.identity["n_frozen"] = n_frozen

    def record(self, metrics: EpochMetrics) -> None:
        """Take one finished epoch into the history (the weights have already moved on)."""
        self.history.append(metrics)
        self.epoch = metrics.epoch
        self.stopped_early = metrics.stop
        if metrics.is_best:
            self.best_val_acc, self.best_epoch = metrics.val_acc, metrics.epoch

    def checkpoint(self) -> dict[str, Any]:
        """The run as a plain dict. With a weight average, "model" holds the average (what was validated and
        is served) and "ema" the live weights it came from, with the update count."""
        ema = None
        if self.ema is not None:
            with self.ema.applied(self.model):
                model = {k: t.clone() for k, t in self.model.state_dict().items()}
            live = self.model.state_dict()
            ema = {"live": {k: live[k].clone() for k in self.ema.names}, "updates": self.ema.updates}
        else:
            model = self.model.state_dict()
        state = {
            **self.identity,
            "model": model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "epoch": self.epoch,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "history": [m.to_dict() for m in self.history],
            "stopped_early": self.stopped_early,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if ema is not None:
            state["ema"] = ema
        return state

    def commit(self, checkpoints_dir: Path, is_best: bool) -> None:
        """Write best_model.pth (on a new best), then last.pth: a crash in between re-runs the epoch,
        which rewrites the same best."""
        state = self.checkpoint()
        if is_best:
            ckpt.save_checkpoint(state, checkpoints_dir / ckpt.BEST)
        ckpt.save_checkpoint(state, checkpoints_dir / ckpt.LAST)

    def summary(self) -> RunSummary:
        return RunSummary(epoch=self.epoch, best_val_acc=self.best_val_acc, best_epoch=self.best_epoch,
                          mlflow_run_id=self.mlflow_run_id, history=tuple(self.history),
                          stopped_early=self.stopped_early)


# Keys of a checkpoint that describe the run rather than its progress.
IDENTITY_KEYS = ("classes", "params", "model_name", "n_frozen", "img_size", "mean", "std", "interpolation",
                 "mlflow_run_id", "run_uid")


def summary_of(checkpoint: dict[str, Any]) -> RunSummary:
    """A checkpoint's progress as a RunSummary."""
    return RunSummary(
        epoch=checkpoint["epoch"],
        best_val_acc=checkpoint["best_val_acc"],
        best_epoch=checkpoint.get("best_epoch", 0),
        mlflow_run_id=checkpoint.get("mlflow_run_id"),
        history=tuple(EpochMetrics.from_dict(m) for m in checkpoint["history"]),
        stopped_early=checkpoint.get("stopped_early", False),
    )


def _weight_average(cfg: TrainConfig, model: nn.Module, n_frozen: int, saved: dict | None) -> WeightEma | None:
    """The run's weight average (ema_decay > 0). `model` was loaded with the checkpoint's "model": the
    average, if the checkpoint kept one; its live weights go back into `model`. Turning ema_decay on
    when resuming starts the average at the current weights; turning it off goes on from the live ones."""
    if saved is not None:
        average = WeightEma(model, n_frozen, cfg.ema_decay) if cfg.ema_decay else None  # copies `model`'s
        model.load_state_dict(saved["live"], strict=False)
        if average is not None:
            average.updates = int(saved["updates"])
        return average
    return WeightEma(model, n_frozen, cfg.ema_decay) if cfg.ema_decay else None


def _placed(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model
