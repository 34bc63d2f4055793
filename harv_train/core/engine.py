"""One epoch of training and one pass of evaluation, as plain PyTorch functions.

No Prefect, no MLflow, no files: the caller hands in the model, optimizer and data and gets numbers
back. The frozen prefix of the backbone runs in eval mode under no_grad; only the trainable rest
builds an autograd graph.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from harv_train.core.augment import SEED_HFLIP, apply_augmentation, draw_augmentation, draws_to, normalize
from harv_train.core.data import DecodedSplit
from harv_train.core.failpoints import failpoint
from harv_train.core.freezing import forward_from, frozen_features, set_train_mode
from harv_train.core.imbalance import epoch_order
from harv_train.core.policies import apply_policy, draw_policy

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: no progress bar without it
    tqdm = None


@dataclass(frozen=True)
class Recipe:
    """What a training step takes from the recipe params (issue 14); the defaults are the seed's."""

    hflip: float = SEED_HFLIP  # probability of a horizontal flip per sample; 0 never flips
    label_smoothing: float = 0.0  # of the training loss only; validation reports the plain NLL
    augment: str = "seed"  # seed, trivial or randaugment (harv_train/core/policies.py)
    random_resized_crop: float = 0.0  # the crop's smallest scale; 0: no crop


SEED_RECIPE = Recipe()


@dataclass
class EpochResult:
    loss: float
    acc: float
    batches: int
    images: int
    seconds: float
    macro_f1: float = 0.0  # computed by evaluate() only


def macro_f1(confusion: torch.Tensor) -> float:
    """The unweighted mean over classes of F1, from a confusion matrix (rows true, columns predicted);
    a class never predicted or never present has F1 0, as in harv_train/reporting/metrics.py."""
    confusion = confusion.double()
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300),
                     torch.zeros_like(tp))
    return float(f1.mean())


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: rank 0 of 1 unless launched by torchrun."""

    rank: int = 0
    size: int = 1

    def sum(self, *values: float) -> list[float]:
        """Each value summed over every rank (all ranks get the totals)."""
        if self.size == 1:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers of `module` (BatchNorm running statistics).

        DistributedDataParallel broadcasts them from rank 0 at the start of each training forward; with
        distributed.sync_batchnorm false that forward then updates each rank's statistics with its own
        share of the batch: after the last step the ranks would hold different models, and rank 0's is
        the one that is saved. (Synchronized, they agree already; the broadcast costs one collective.)"""
        self.broadcast_tensors(list(module.buffers()))

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors`, in place on every rank."""
        if self.size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():  # one collective per dtype, not one per tensor
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


SINGLE = World()

# Autocast dtype on CUDA. float16 needs the GradScaler that RunState keeps; bfloat16 would not
# (benchmarks/bench_gpu.py measures both).
CUDA_AUTOCAST_DTYPE = torch.float16


@dataclass
class Pipeline:
    """How batches become network input: normalization, device and memory layout."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    channels_last: bool = True
    num_workers: int = 0
    amp_dtype: torch.dtype | None = None  # None: CUDA_AUTOCAST_DTYPE on CUDA, no autocast elsewhere

    @property
    def memory_format(self) -> torch.memory_format:
        # Augmentation and normalization write their output in this format: no extra copy per batch.
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        # Mixed precision by default only on CUDA: bf16 on AVX2 CPUs is 10-20x slower, never a win.
        dtype = self.amp_dtype or (CUDA_AUTOCAST_DTYPE if self.device.type == "cuda" else None)
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if enabled and tqdm is not None and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)
    return iterable


def train_one_epoch(
    model: nn.Module,
    n_frozen: int,
    optimizer: torch.optim.Optimizer,
    data: DecodedSplit,
    batch_size: int,
    pipeline: Pipeline,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    world: World = SINGLE,
    trainable: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefix: nn.Module | None = None,
    recipe: Recipe = SEED_RECIPE,
    class_weights: torch.Tensor | None = None,
    sampler: str = "shuffle",
    after_step: Callable[[], None] | None = None,
) -> EpochResult:
    """Shuffle, augment, forward, backward, step over every training image once (`sampler: balanced`:
    as many images drawn class-balanced; `class_weights` weigh the loss, see core/imbalance.py).

    `batch_size` is the global batch. In a data-parallel run every rank draws the same order and the
    same augmentation for each global batch and takes every `world.size`-th sample of it, so the
    ranks together see exactly what one process would. `trainable` runs the network after the
    frozen prefix (a DistributedDataParallel wrapper there); by default the model itself. `prefix`
    stands in for the frozen blocks (their BatchNorm-folded copy, see freezing.fused_frozen_prefix).
    `after_step` runs after every optimizer step (the weight average of `ema_decay`).
    """
    start = time.perf_counter()
    criterion = nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(pipeline.device),
                                    label_smoothing=recipe.label_smoothing)
    set_train_mode(model, n_frozen)
    if trainable is None:  # not `or`: a compiled module refuses to be tested for truth (it has no len)
        trainable = lambda h: forward_from(model, n_frozen, h)  # noqa: E731
    order = epoch_order(data.labels, generator, sampler)
    global_batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if world.size > 1:  # every rank needs a share of every step: a last batch smaller than the world is dropped
        global_batches = [b for b in global_batches if len(b) >= world.size]
    mine = [torch.arange(world.rank, len(b), world.size) for b in global_batches]
    if recipe.augment == "seed" and not recipe.random_resized_crop:  # the seed's own path, bit for bit
        draws = draws_to([draw_augmentation(len(b), generator, recipe.hflip).select(rows)
                          for b, rows in zip(global_batches, mine)], pipeline.device)
        augment = apply_augmentation
    else:  # drawn on the host; each batch sends its few per-sample numbers along (policies.py)
        size = (data.img_size, data.img_size)
        draws = [draw_policy(len(b), generator, recipe.augment, size, recipe.hflip, recipe.random_resized_crop).select(rows)
                 for b, rows in zip(global_batches, mine)]
        augment = apply_policy
    chunks = [b[rows] for b, rows in zip(global_batches, mine)]
    if data.cached and data.images.device.type != "cpu":  # the images live on the GPU: so do their indices
        chunks = list(torch.cat(chunks).to(data.images.device).split([len(c) for c in chunks]))
    # Totals stay on the device: reading one back each step would make the CPU wait for the GPU.
    total_loss = torch.zeros((), dtype=torch.float64, device=pipeline.device)
    correct = torch.zeros((), dtype=torch.int64, device=pipeline.device)
    seen = 0

    def inputs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (images, labels), draw in zip(data.batches_of(chunks, pipeline.num_workers), draws):
            images = images.to(pipeline.device, non_blocking=True)
            labels = labels.to(pipeline.device, non_blocking=True)
            yield augment(images, draw, pipeline.mean, pipeline.std, pipeline.memory_format), labels

    for x, labels in _progress(inputs(), len(chunks), "train", progress):
        with pipeline.autocast():
            logits = trainable(frozen_features(model, n_frozen, x, prefix))
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step()
        failpoint("train_batch")
        total_loss += loss.detach().double() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    world.broadcast_buffers(model)  # every rank goes on (to validation) with the model rank 0 saves
    loss_sum, correct, seen = world.sum(float(total_loss), int(correct), seen)
    return EpochResult(
        loss=loss_sum / seen,
        acc=correct / seen,
        batches=len(chunks),
        images=int(seen),
        seconds=time.perf_counter() - start,
    )


def frozen_feature_batches(
    model: nn.Module,
    n_frozen: int,
    data: DecodedSplit,
    batch_size: int,
    pipeline: Pipeline,
    world: World = SINGLE,
    prefix: nn.Module | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(frozen-prefix output, labels) for this rank's share of the images, no augmentation.

    Every image belongs to exactly one rank (no padding): summed over ranks, evaluation counts each
    validation image once."""
    model.eval()
    order = torch.arange(world.rank, len(data), world.size)
    with torch.no_grad():
        for images, labels in data.batches(order, batch_size, pipeline.num_workers):
            x = normalize(images.to(pipeline.device), pipeline.mean, pipeline.std, pipeline.memory_format)
            with pipeline.autocast():
                yield frozen_features(model, n_frozen, x, prefix), labels.to(pipeline.device)


def evaluate(
    model: nn.Module,
    n_frozen: int,
    feature_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    world: World = SINGLE,
) -> EpochResult:
    """Loss and accuracy of the trainable rest of the network on precomputed frozen features.

    Validation has no augmentation and the frozen prefix never changes, so its output can be
    computed once per run (see `frozen_feature_batches`) and reused every epoch.
    """
    start = time.perf_counter()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    total_loss = 0.0
    correct = 0
    seen = 0
    batches = 0
    confusion: torch.Tensor | None = None  # int64 [C, C], for the macro F1
    with torch.no_grad():
        for features, labels in feature_batches:
            # Features made under autocast are float16 or bfloat16; the rest runs in float32 here.
            logits = forward_from(model, n_frozen, features.float()).float()
            total_loss += float(criterion(logits, labels))
            predicted = logits.argmax(1)
            correct += int((predicted == labels).sum())
            seen += len(labels)
            batches += 1
            n = logits.shape[1]
            counts = torch.bincount((labels * n + predicted).cpu(), minlength=n * n).view(n, n)
            confusion = counts if confusion is None else confusion + counts
    total_loss, correct, seen = world.sum(total_loss, correct, seen)
    if confusion is not None and world.size > 1:
        confusion = torch.tensor(world.sum(*confusion.flatten().tolist())).round().long().view(confusion.shape)
    return EpochResult(
        loss=total_loss / seen,
        acc=correct / seen,
        batches=batches,
        images=int(seen),
        seconds=time.perf_counter() - start,
        macro_f1=macro_f1(confusion) if confusion is not None else 0.0,
    )
