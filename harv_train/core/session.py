"""What one training run keeps in memory between its steps, owned by whoever drives the run.

A `TrainingSession` holds the decoded images, the live `RunState` and what is derived from the
frozen weights (their BatchNorm-folded copy and the validation set's frozen features). The files
stay the truth: `start` writes epoch 0 to last.pth, each epoch commits best-then-last, and an epoch
that fails drops the live state, so the next attempt restores it from last.pth and redoes exactly
the lost work. Each epoch's randomness depends only on (seed, epoch): a resumed or retried run
computes what an uninterrupted one would.

The flow owns one session per run (a Prefect retry runs in the same session); a torchrun worker
owns one per epoch; a new process starts with an empty one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harv_train.config import TrainConfig
from harv_train.core import checkpoints as ckpt
from harv_train.core.checks import changed_params, check_resumable
from harv_train.core.compiled import compile_trainable
from harv_train.core.data import DecodedSplit, load_dataset
from harv_train.core.decoded_cache import resolve_cache_dir
from harv_train.core.engine import (SINGLE, Pipeline, Recipe, World, evaluate, frozen_feature_batches,
                                    train_one_epoch)
from harv_train.core.freezing import feature_blocks, forward_from, frozen_block_count, fused_frozen_prefix
from harv_train.core.global_dropout import draw_global_masks
from harv_train.core.imbalance import balanced_class_weights, class_counts
from harv_train.core.lineage import DatasetInfo, describe_dataset
from harv_train.core.models import model_spec
from harv_train.core.run_state import EpochMetrics, RunState, RunSummary, step_scheduler, summary_of
from harv_train.core.sync_batchnorm import synchronize_batchnorm
from harv_train.core.runtime import available_cores, configure_threads, epoch_seed, resolve_device
from harv_train.core.splits import write_split_lists
from harv_train.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSummary:
    """The decoded dataset in numbers: what the flow logs."""

    classes: tuple[str, ...]
    train_images: int
    val_images: int
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    skipped_images: tuple[str, ...]
    cached: bool
    test_images: int = 0  # 0: no test split
    test_counts: dict[str, int] = dataclasses.field(default_factory=dict)


class TrainingSession:
    def __init__(self, cfg: TrainConfig, data_on_device: bool = True):
        self.cfg = cfg
        # On a GPU, a cached train split is copied there once, so no batch waits for a host copy.
        self.data_on_device = data_on_device
        self._device_train: DecodedSplit | None = None
        self.device = resolve_device(cfg.device)
        spec = model_spec(cfg.model_name)
        self.pipeline = Pipeline(mean=spec.mean, std=spec.std, device=self.device,
                                 channels_last=cfg.channels_last, num_workers=cfg.num_workers)
        self._splits: dict[str, DecodedSplit] | None = None
        self.state: RunState | None = None
        # Derived from the frozen weights: keyed by the run (run_uid) and n_frozen, which unfreezing lowers.
        self._frozen_for: tuple[str, int] | None = None
        self._prefix: nn.Module | None = None
        self._val_features: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._compiled_for: tuple[nn.Module, int] | None = None  # the (model, n_frozen) _compiled runs
        self._compiled: nn.Module | None = None

    @property
    def last_path(self) -> Path:
        return self.cfg.checkpoints_dir / ckpt.LAST

    def splits(self) -> dict[str, DecodedSplit]:
        """The train and val images (and test's, when there is a test split), decoded on first use (which also proves each one readable)."""
        if self._splits is None:
            cfg = self.cfg
            self._splits = load_dataset(cfg.data_dir, cfg.classes, cfg.img_size, model_spec(cfg.model_name).interpolation,
                                        cfg.cache_max_mb, cfg.skip_bad_images, cfg.cache_dir, cfg.num_workers,
                                        cfg.val_fraction, cfg.test_fraction, cfg.seed)
            train = self._splits["train"]
            sizes = ", ".join(f"{len(s)} {name} ({s.decoded} decoded now)" for name, s in self._splits.items())
            logger.info(f"Decoded images: {sizes}, cached in {resolve_cache_dir(cfg.cache_dir)}; the train split "
                        + ("is held in memory" if train.cached else "is read from there batch by batch (cache_max_mb)"))
        return self._splits

    def train_split(self) -> DecodedSplit:
        """The train split as the epochs read it: on the device when it is a GPU and the split is cached
        (the uint8 images take 150 KB each at 224 px); `splits()` stays on the CPU for everyone else."""
        split = self.splits()["train"]
        if not (self.data_on_device and split.cached and self.device.type != "cpu"):
            return split
        if self._device_train is None:
            self._device_train = dataclasses.replace(
                split, images=split.images.to(self.device), labels=split.labels.to(self.device))
        return self._device_train

    def describe_data(self) -> DataSummary:
        train, val, test = self.splits()["train"], self.splits()["val"], self.splits().get("test")
        return DataSummary(
            classes=tuple(train.classes),
            train_images=len(train),
            val_images=len(val),
            train_counts=_counts(train),
            val_counts=_counts(val),
            skipped_images=tuple(train.skipped + val.skipped + (test.skipped if test else [])),
            cached=train.cached and val.cached,
            test_images=len(test) if test else 0,
            test_counts=_counts(test) if test else {},
        )

    def dataset_info(self) -> DatasetInfo:
        """The dataset as trained, for MLflow's Dataset column: name, digest of its files, sizes, class counts."""
        splits = self.splits()
        return describe_dataset(self.cfg.data_dir, splits["train"].classes,
                                {n: (s.paths, s.labels.tolist()) for n, s in splits.items()})

    def write_split_lists(self, out_dir: Path) -> list[Path]:
        """`out_dir/<split>.csv`: every image of each split (path relative to data_dir, class), as trained."""
        root = Path(self.cfg.data_dir)
        splits = self.splits()
        return write_split_lists(root, splits["train"].classes, {n: s.paths for n, s in splits.items()},
                                 {n: s.labels.tolist() for n, s in splits.items()}, out_dir)

    def start(self, mlflow_run_id: str | None) -> RunSummary:
        """A new run: the pretrained, frozen model written as epoch 0 to last.pth."""
        self.state = RunState.new(self.cfg, self.splits()["train"].classes, mlflow_run_id, self.device)
        self.state.commit(self.cfg.checkpoints_dir, is_best=False)
        return self.state.summary()

    def resume(self) -> RunSummary:
        """The run in last.pth, checked to be this run (model, classes, image size, freezing)."""
        ckpt.remove_stale_temporaries(self.cfg.checkpoints_dir)  # a write that a kill interrupted
        state = check_resumable(self.cfg, self.splits()["train"].classes)
        logger.info(f"Resuming from {self.last_path}: {state['epoch']} epoch(s) done, "
                    f"best val accuracy {max(state['best_val_acc'], 0):.4f}")
        changed = changed_params(state["params"], self.cfg.to_dict())
        if changed:  # allowed (more epochs, another lr), but worth seeing: e.g. another registered model
            logger.info("Params differ from the run being resumed: " + ", ".join(changed))
        self.state = None  # restored from the file by the first epoch
        return summary_of(state)

    def drop(self) -> None:
        """Forget the live state: the next epoch restores it from last.pth (after a failure, or when
        other processes wrote it)."""
        self.state = None

    def train_epoch(self, epoch: int, world: World = SINGLE, progress: bool = True) -> EpochMetrics:
        """Train epoch `epoch` (0-based) and commit it. Idempotent: an epoch last.pth already holds
        is not trained again. Under torchrun every rank runs this; only rank 0 writes checkpoints."""
        cfg = self.cfg
        if not cfg.threads and world.size > 1:
            configure_threads(max(1, available_cores() // cfg.distributed.nproc_per_node))
        else:
            configure_threads(cfg.threads)
        try:
            state = self.state or self._restore()
            if state.epoch > epoch:
                done = state.history[epoch]
                return dataclasses.replace(done, stop=done.stop or (state.stopped_early and done.epoch == state.epoch))
            if state.epoch != epoch:
                raise CheckpointError(
                    f"{self.last_path} holds {state.epoch} epochs, cannot train epoch {epoch + 1}: resume instead")
            self._unfreeze_for(state, epoch, world)
            metrics = self._train(state, epoch, world, progress and world.rank == 0)
            state.record(metrics)
            if world.rank == 0:
                state.commit(cfg.checkpoints_dir, metrics.is_best)
                if metrics.is_best:
                    logger.info(f"New best model: val accuracy {metrics.val_acc:.4f}, macro F1 {metrics.val_macro_f1:.4f} "
                                f"(loss {metrics.val_loss:.4f}) "
                                f"at epoch {metrics.epoch} -> {cfg.checkpoints_dir / ckpt.BEST}")
            if metrics.stop:
                metric = "val accuracy" if cfg.select_metric == "val_acc" else "val macro F1"
                logger.info(f"Early stopping: no better model ({metric}, then val loss) for "
                            f"{cfg.early_stopping_patience} epochs")
            return metrics
        except BaseException:
            self.drop()  # the weights in memory may have moved on: a retry starts from last.pth
            raise

    def finish(self) -> RunSummary:
        """final_model.pth is the last epoch's state; returns the run's summary."""
        state = ckpt.load_checkpoint(self.last_path)
        ckpt.save_checkpoint(state, self.cfg.checkpoints_dir / ckpt.FINAL)
        return summary_of(state)

    def _restore(self) -> RunState:
        self.state = RunState.restore(self.cfg, self.last_path, self.device)
        return self.state

    def _unfreeze_for(self, state: RunState, epoch: int, world: World) -> None:
        """Staged unfreezing: fewer frozen blocks from the epochs `unfreeze` names on."""
        ratio = self.cfg.frozen_ratio_at(epoch)
        n_frozen = frozen_block_count(state.model, ratio)
        if n_frozen < state.n_frozen:
            if world.rank == 0:
                logger.info(f"Unfreezing: epoch {epoch + 1} trains stages {n_frozen + 1}-"
                            f"{len(feature_blocks(state.model))} (freeze_ratio {ratio}: {n_frozen} "
                            f"{'stage' if n_frozen == 1 else 'stages'} frozen, "
                            f"were {state.n_frozen})")
            state.unfreeze(n_frozen)

    def _frozen_prefix(self, state: RunState) -> nn.Module | None:
        # The frozen part changes only with the run (run_uid) or when blocks are unfrozen (n_frozen).
        if self._frozen_for != (state.run_uid, state.n_frozen):
            self._frozen_for, self._val_features = (state.run_uid, state.n_frozen), None
            self._prefix = fused_frozen_prefix(state.model, state.n_frozen) if state.n_frozen else None
        return self._prefix

    def _compiled_trainable(self, state: RunState) -> nn.Module:
        """The trainable part through torch.compile, compiled again only for a new model (a restore) or a
        new frozen prefix (unfreezing)."""
        if self._compiled_for != (state.model, state.n_frozen):
            self._compiled_for = (state.model, state.n_frozen)
            self._compiled = compile_trainable(_TrainablePart(state.model, state.n_frozen), self.cfg.cache_dir)
        return self._compiled

    def _train(self, state: RunState, epoch: int, world: World, progress: bool) -> EpochMetrics:
        cfg, model, n_frozen = self.cfg, state.model, state.n_frozen
        splits = self.splits()
        prefix = self._frozen_prefix(state)
        seed = epoch_seed(cfg.seed, epoch)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation
        lr = state.optimizer.param_groups[0]["lr"]
        trainable = None
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self._compute_as_one_process(model, n_frozen, world)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            trainable = DistributedDataParallel(_TrainablePart(model, n_frozen), device_ids=device_ids)
        elif cfg.compile:
            trainable = self._compiled_trainable(state)
        train = train_one_epoch(model, n_frozen, state.optimizer, self.train_split(), cfg.batch_size, self.pipeline,
                                generator, state.scaler, progress, world, trainable, prefix,
                                Recipe(hflip=cfg.hflip, label_smoothing=cfg.label_smoothing, augment=cfg.augment,
                                       random_resized_crop=cfg.random_resized_crop),
                                self._class_weights(), cfg.sampler,
                                after_step=(lambda: state.ema.update(model)) if state.ema else None)
        if state.ema is not None:  # BatchNorm statistics went into each rank's average: take rank 0's
            world.broadcast_tensors(list(state.ema.average.values()))

        val_start = time.perf_counter()
        features = self._val_features or self._collect_val_features(
            frozen_feature_batches(model, n_frozen, splits["val"], cfg.batch_size, self.pipeline, world, prefix))
        with state.ema.applied(model) if state.ema else contextlib.nullcontext():
            val = evaluate(model, n_frozen, features, world)
        val.seconds = time.perf_counter() - val_start  # includes the frozen features when computed this epoch

        step_scheduler(state.scheduler, val.loss)
        is_best = state.stopper.step(val.acc if cfg.select_metric == "val_acc" else val.macro_f1, val.loss)
        logger.info(f"Epoch {epoch + 1}/{cfg.epochs}")
        logger.info(f"Train: loss={train.loss:.4f}, accuracy={train.acc:.4f} ({train.batches} batches, {train.seconds:.1f}s)")
        logger.info(f"Val: loss={val.loss:.4f}, accuracy={val.acc:.4f}, macro F1={val.macro_f1:.4f} "
                    f"({val.batches} batches, {val.seconds:.1f}s)")
        return EpochMetrics(
            epoch=epoch + 1, train_loss=train.loss, train_acc=train.acc, val_loss=val.loss, val_acc=val.acc, lr=lr,
            train_time_s=train.seconds, val_time_s=val.seconds, train_batches=train.batches,
            val_batches=val.batches, is_best=is_best, stop=state.stopper.should_stop, val_macro_f1=val.macro_f1,
        )

    def _class_weights(self) -> torch.Tensor | None:
        """The loss weights of `class_weights: balanced` (inverse frequency in the train split), else None."""
        if self.cfg.class_weights != "balanced":
            return None
        train = self.splits()["train"]
        return balanced_class_weights(class_counts(train.labels, len(train.classes)))

    def _compute_as_one_process(self, model: nn.Module, n_frozen: int, world: World) -> None:
        """The layers that see the batch as a whole see the global batch: trainable BatchNorm (unless
        distributed.sync_batchnorm is false) and the dropout masks. In place, before DDP wraps the model."""
        parts = []
        if self.cfg.distributed.sync_batchnorm:  # "auto" and True
            kind = "SyncBatchNorm" if self.device.type == "cuda" else "an all-reduce of their statistics"
            parts.append(f"{synchronize_batchnorm(model, n_frozen, self.device)} trainable BatchNorm layers "
                         f"normalize over it ({kind})")
        parts.append(f"{draw_global_masks(model, world.rank, world.size)} dropout layers draw its masks")
        if world.rank == 0:
            logger.info(f"Global batch of {world.size} processes: " + ", ".join(parts))

    def _collect_val_features(self, batches):
        """Pass the batches through, keeping them for later epochs while they fit in cache_max_mb."""
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        used = 0
        for features, labels in batches:
            used += features.numel() * features.element_size()
            if kept is not None and used <= self.cfg.cache_max_mb * 2**20:
                kept.append((features, labels))
            else:
                kept = None
            yield features, labels
        if kept is not None:
            self._val_features = kept


class _TrainablePart(nn.Module):
    """The network after the frozen prefix, as one module: what DistributedDataParallel wraps. Its
    frozen parameters do not require grad, so DDP leaves them out of its gradient buckets and every
    parameter it does reduce receives a gradient each step (no find_unused_parameters needed)."""

    def __init__(self, model: nn.Module, n_frozen: int):
        super().__init__()
        self.model, self.n_frozen = model, n_frozen

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return forward_from(self.model, self.n_frozen, h)


def _counts(split: DecodedSplit) -> dict[str, int]:
    counts = torch.bincount(split.labels, minlength=len(split.classes)).tolist()
    return dict(zip(split.classes, counts))
