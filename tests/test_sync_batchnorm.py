"""BatchNorm over the global batch (distributed.sync_batchnorm) on the CPU: two gloo processes against one.

One spawn of two real gloo ranks (module fixture) computes what every test here checks against a single
process: GlobalBatchNorm2d's output, input and parameter gradients and running statistics against plain
BatchNorm2d on the concatenated batch, and a few training steps of MobileNetV3-Small (random init, a
frozen prefix, trainable BatchNorm, DistributedDataParallel) with and without the synchronization.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from harv_train.core.freezing import (
    freeze_early_blocks,
    frozen_block_count,
    frozen_features,
    fused_frozen_prefix,
    set_train_mode,
    trainable_parameters,
)
from harv_train.core.models import build_model
from harv_train.core.global_dropout import draw_global_masks
from harv_train.core.session import _TrainablePart
from harv_train.core.sync_batchnorm import GlobalBatchNorm2d, convert_batchnorm, synchronize_batchnorm

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 5
IMG = 64
CLASSES = 3


def _layer_case():
    """A global batch for one BatchNorm layer: input (mean far from 0, so the variance cancels), weight,
    bias, and the upstream gradient of the summed loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_BATCH, 4, 5, 5, generator=g, dtype=torch.float32) * 3 + 5
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    upstream = torch.randn(x.shape, generator=g)
    return x, weight, bias, upstream


def _batchnorm_pass(bn: nn.BatchNorm2d, x: torch.Tensor, upstream: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * upstream).sum().backward()
    out = {"y": y.detach(), "dx": x.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
           "running_mean": bn.running_mean, "running_var": bn.running_var}
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def _layer(cls, weight, bias):
    bn = cls(4, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _model(seed: int, dropout: bool = False) -> tuple[nn.Module, int]:
    """MobileNetV3-Small, random init, half frozen: its trainable blocks hold BatchNorm layers over 4x4
    and 2x2 maps; the head's dropout (p 0.2) on or off."""
    torch.manual_seed(seed)
    model = build_model("mobilenet_v3_small", CLASSES, pretrained=False)
    for m in model.modules():
        if isinstance(m, nn.Dropout) and not dropout:
            m.p = 0.0
    n_frozen = frozen_block_count(model, 0.5)
    freeze_early_blocks(model, n_frozen)
    return model, n_frozen


def _steps() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 3, IMG, IMG, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g))
            for _ in range(STEPS)]


def _train_steps(rank: int, world: int, sync: bool, device: torch.device = torch.device("cpu"),
                 dropout: bool = False, global_masks: bool = True) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS SGD steps on the global batches as the engine takes them (rank r: every world-th sample);
    returns the global mean loss of each step and the model's state dict. With `dropout`, the ranks draw
    the global batch's masks (as the session has them do) unless `global_masks` is False."""
    model, n_frozen = _model(seed=3, dropout=dropout)
    model.to(device)
    if world > 1 and dropout and global_masks:
        assert draw_global_masks(model, rank, world) == 1  # the head's Dropout
    torch.manual_seed(11)  # the dropout stream, alike in every process
    prefix = fused_frozen_prefix(model, n_frozen)
    trainable: nn.Module = _TrainablePart(model, n_frozen)
    if world > 1:
        if sync:
            assert synchronize_batchnorm(model, n_frozen, device) > 0
        device_ids = [device.index] if device.type == "cuda" else None
        trainable = nn.parallel.DistributedDataParallel(trainable, device_ids=device_ids)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.05)
    losses = []
    for x, labels in _steps():
        set_train_mode(model, n_frozen)
        x, labels = x[rank::world].to(device), labels[rank::world].to(device)
        loss = nn.functional.cross_entropy(trainable(frozen_features(model, n_frozen, x, prefix)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, init_file: str, out: str, backend: str, device_type: str) -> None:
    torch.set_num_threads(1)
    # nccl needs a GPU per rank; gloo lets two ranks share one.
    device = torch.device(device_type, rank if backend == "nccl" else 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":  # float32 convolutions (no TF32), as the single-process reference runs them
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, weight, bias, upstream = _layer_case()
        bn, converted = convert_batchnorm(_layer(nn.BatchNorm2d, weight, bias).to(device), device)
        assert converted == 1
        layer = _batchnorm_pass(bn, x[rank::WORLD].to(device), upstream[rank::WORLD].to(device))
        synced, synced_state = _train_steps(rank, WORLD, sync=True, device=device)
        unsynced, _ = _train_steps(rank, WORLD, sync=False, device=device)
        dropout, _ = _train_steps(rank, WORLD, sync=True, device=device, dropout=True)
        local_masks, _ = _train_steps(rank, WORLD, sync=True, device=device, dropout=True, global_masks=False)
        torch.save({"layer": layer, "synced": synced, "unsynced": unsynced, "state": synced_state,
                    "dropout": dropout, "local_masks": local_masks,
                    "layer_class": type(bn).__name__}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(tmp, backend: str = "gloo", device_type: str = "cpu") -> list[dict]:
    """Two real ranks of `backend` (gloo: CPU or one GPU shared; nccl: a GPU each): what they computed."""
    mp.spawn(_rank, args=(str(tmp / "init"), str(tmp), backend, device_type), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(tmp_path_factory.mktemp("sync_batchnorm"))


@pytest.fixture(scope="module")
def one_rank() -> tuple[list[float], dict[str, torch.Tensor]]:
    return _train_steps(rank=0, world=1, sync=False)


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rank r's rows were x[r::WORLD]: back into the global batch's order."""
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::WORLD] = p
    return out


def test_global_batchnorm_equals_batchnorm_on_the_concatenated_batch(two_ranks):
    """Output, input gradient and running statistics of the whole batch; DDP averages the parameter
    gradients, so the ranks' shares sum to plain BatchNorm's gradient of the summed loss."""
    assert two_ranks[0]["layer_class"] == "GlobalBatchNorm2d"
    assert_layer_matches_batchnorm(two_ranks)


def assert_layer_matches_batchnorm(two_ranks: list[dict]) -> None:
    x, weight, bias, upstream = _layer_case()
    x64, up64 = x.double(), upstream.double()
    plain = _batchnorm_pass(_layer(nn.BatchNorm2d, weight, bias).double(), x64, up64)
    ranks = [r["layer"] for r in two_ranks]
    for key in ("y", "dx"):
        torch.testing.assert_close(_interleave([r[key] for r in ranks]).double(), plain[key], rtol=1e-5, atol=1e-5)
    for key in ("dweight", "dbias"):
        torch.testing.assert_close(sum(r[key] for r in ranks).double(), plain[key], rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):  # running_var from the unbiased variance, as BatchNorm
        for r in ranks:
            torch.testing.assert_close(r[key].double(), plain[key], rtol=1e-6, atol=1e-6)


def test_two_synchronized_processes_train_as_one_with_the_same_global_batch(two_ranks, one_rank):
    assert_synchronized_ranks_train_as_one(two_ranks, one_rank)


def assert_synchronized_ranks_train_as_one(two_ranks: list[dict], one_rank, rel: float = 1e-4) -> None:
    single, single_state = one_rank
    synced = two_ranks[0]["synced"]
    assert synced == two_ranks[1]["synced"]  # every rank logs the same global loss
    assert synced == pytest.approx(single, rel=rel, abs=1e-5), (synced, single)
    print(f"largest per-step loss difference: {max(abs(a - b) for a, b in zip(synced, single)):.2e}")
    # The weights and running statistics after the steps are one process's too, under the same keys.
    state = two_ranks[0]["state"]
    assert list(state) == list(single_state)
    worst = max(float((state[k].double() - single_state[k].double()).abs().max()) for k in state if state[k].numel())
    assert worst < 10 * rel, worst


def test_without_synchronization_two_processes_train_another_network(two_ranks, one_rank):
    """What distributed.sync_batchnorm: false gives (DistributedDataParallel's default): each rank
    normalizes over its 4 images, and the losses part from one process's."""
    single, _ = one_rank
    unsynced_gap = max(abs(a - b) for a, b in zip(two_ranks[0]["unsynced"], single))
    synced_gap = max(abs(a - b) for a, b in zip(two_ranks[0]["synced"], single))
    assert unsynced_gap > 1e-3 and unsynced_gap > 100 * synced_gap, (unsynced_gap, synced_gap)


def test_the_converted_model_keeps_the_plain_batchnorm_state_dict():
    """A synchronized model's checkpoint loads into the plain architecture (resume, export, evaluation)."""
    model, n_frozen = _model(seed=5)
    plain = copy.deepcopy(model.state_dict())
    params_before = [id(p) for p in trainable_parameters(model)]
    converted = synchronize_batchnorm(model, n_frozen, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert converted == sum(isinstance(m, GlobalBatchNorm2d) for m in bns) > 0
    assert all(not isinstance(m, GlobalBatchNorm2d) for m in model.features[:n_frozen].modules())  # frozen: as is
    assert [id(p) for p in trainable_parameters(model)] == params_before  # the optimizer's tensors
    assert synchronize_batchnorm(model, n_frozen, torch.device("cpu")) == 0  # idempotent
    state = model.state_dict()
    assert list(state) == list(plain) and all(torch.equal(state[k], plain[k]) for k in state)
    fresh, _ = _model(seed=6)
    fresh.load_state_dict(state, strict=True)


def test_with_dropout_the_ranks_draw_the_global_batch_masks_and_train_as_one(two_ranks):
    """The head's dropout on: each rank keeps its rows of the mask one process draws for the global batch,
    so the steps stay one process's; with each rank drawing for its own rows (plain nn.Dropout, all
    ranks seeded alike) they do not."""
    single, _ = _train_steps(rank=0, world=1, sync=False, dropout=True)
    assert two_ranks[0]["dropout"] == pytest.approx(single, rel=1e-4, abs=1e-5), (two_ranks[0]["dropout"], single)
    assert max(abs(a - b) for a, b in zip(two_ranks[0]["local_masks"], single)) > 1e-3
