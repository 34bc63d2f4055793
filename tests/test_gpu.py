"""The CUDA path: fp16 autocast with its GradScaler, resume, export and the augmentation on a GPU.

Tests marked `gpu` need a CUDA device. `make test` deselects them (pyproject's addopts) and
tests/conftest.py hides the GPUs from every test unless HARV_TRAIN_GPU_TESTS=1;
benchmarks/gpu_check.sh sets it and runs `pytest -m gpu tests/test_gpu.py`. They import only
harv_train's core and reporting (no Prefect, no MLflow), so a machine with torch needs little more.
The tests without the mark run everywhere: the code paths they share with the GPU, on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

# cuBLAS reads this when it starts (the first matmul): deterministic GEMMs for the resume test.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from harv_train.core import checkpoints as ckpt  # noqa: E402
from harv_train.core import engine  # noqa: E402
from harv_train.core.augment import apply_augmentation, draw_augmentation, normalize  # noqa: E402
from harv_train.core.session import TrainingSession  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device visible (tests/conftest.py hides it unless HARV_TRAIN_GPU_TESTS=1)",
)


def gpu(test):
    return pytest.mark.gpu(requires_cuda(test))


@pytest.fixture
def deterministic():
    """cuDNN and the other CUDA ops in their deterministic implementations, TF32 off; restored after."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    # warn_only: adaptive_avg_pool2d's CUDA backward (the SE blocks) has no deterministic variant and
    # would otherwise raise; with a 1x1 output its atomic adds never meet, so it computes the same anyway.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def _train(cfg, epochs, **session_args):
    session = TrainingSession(cfg, **session_args)
    session.start(None)
    return session, [session.train_epoch(e, progress=False) for e in range(epochs)]


def _numbers(metrics):
    return [(m.train_loss, m.train_acc, m.val_loss, m.val_acc) for m in metrics]


def _assert_close_runs(a, b, rel=1e-5):
    for ma, mb in zip(_numbers(a), _numbers(b), strict=True):
        assert ma == pytest.approx(mb, rel=rel, abs=1e-7), (ma, mb)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized augmentation output back on the 0-255 scale (float64, CPU)."""
    x = x.detach().double().cpu()
    return x * (torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1) * 255) + \
        torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255


def _near_a_tie(flip: torch.Tensor, angle: torch.Tensor, h: int, w: int, within: float = 1e-3) -> torch.Tensor:
    """[B, H, W]: where nearest-neighbour sampling is within `within` source pixels of the boundary
    between two source pixels (computed in float64). There two float32 implementations of the same grid
    may round to different neighbours: a whole pixel differs, legitimately."""
    theta = angle.double().cpu() * (math.pi / 180)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    mirror = 1 - 2 * flip.double().cpu().view(-1, 1, 1)
    cols = (torch.linspace(-1, 1, w, dtype=torch.float64) * ((w - 1) / w)).view(1, 1, w)
    rows = (torch.linspace(-1, 1, h, dtype=torch.float64) * ((h - 1) / h)).view(1, h, 1)
    gx, gy = mirror * cos * cols - mirror * sin * rows, sin * cols + cos * rows
    ix, iy = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2  # grid_sample's unnormalize, align_corners=False
    return ((ix - ix.floor() - 0.5).abs() < within) | ((iy - iy.floor() - 0.5).abs() < within)


def _assert_same_pixels(a: torch.Tensor, b: torch.Tensor, flip, angle) -> int:
    """Every pixel within 1/255 (one uint8 step) except at nearest-neighbour ties; returns the ties that differed."""
    diff = (_pixels(a) - _pixels(b)).abs().amax(dim=1)  # [B, H, W], worst channel
    ties = _near_a_tie(flip, angle, a.shape[2], a.shape[3])
    assert float(diff[~ties].max()) <= 1.0, f"max difference {float(diff[~ties].max()):.4f} of 255 away from ties"
    differing_ties = int((diff[ties] > 1.0).sum())
    assert differing_ties <= 1e-3 * diff.numel()
    return differing_ties


# --- Everywhere: what the GPU path shares with the CPU ---------------------------------------------------


def test_batched_augmentation_equals_the_per_image_one_on_the_cpu():
    """The GPU takes the whole batch through each pass (few kernel launches); the CPU goes image by image.
    Same draws, same pixels: compared here on the CPU, on the GPU below."""
    x = torch.randint(0, 256, (24, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    draws = draw_augmentation(len(x), torch.Generator().manual_seed(4))
    per_image = apply_augmentation(x, draws, MEAN, STD, torch.channels_last, batched=False)
    batched = apply_augmentation(x, draws, MEAN, STD, torch.channels_last, batched=True)
    assert batched.is_contiguous(memory_format=torch.channels_last)
    assert float((_pixels(per_image) - _pixels(batched)).abs().max()) < 1e-3  # float rounding only


def test_an_autocast_epoch_validates_on_its_half_precision_features(make_config):
    """Under autocast the frozen prefix hands validation float16/bfloat16 features; the second epoch
    evaluates the kept ones outside autocast, where the float32 rest of the network must accept them
    (it raised a dtype error). bfloat16 on the CPU stands in for the GPU's float16 here."""
    inputs = set()
    real = engine.forward_from

    def recording(model, n_frozen, h):
        inputs.add(h.dtype)
        return real(model, n_frozen, h)

    session = TrainingSession(make_config(device="cpu", epochs=2))
    session.pipeline.amp_dtype = torch.bfloat16
    session.start(None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "forward_from", recording)
        history = [session.train_epoch(e, progress=False) for e in range(2)]
    assert torch.bfloat16 in inputs  # the frozen prefix ran under autocast
    assert all(math.isfinite(m.train_loss) and math.isfinite(m.val_loss) for m in history)


def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # the bound; it takes 2 s
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check: skipped" in done.stdout
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["skipped"] is True and "CUDA" in summary["reason"]
    assert json.loads(done.stdout[done.stdout.index("{"):]) == summary  # printed last


# --- On a GPU ------------------------------------------------------------------------------------------


@gpu
def test_amp_training_on_cuda(make_config, monkeypatch):
    """A tiny run on CUDA: autocast in the training forward, a GradScaler, finite losses, and checkpoints
    that load with weights_only=True onto the CPU and compute there."""
    dtypes = set()
    real = engine.forward_from

    def recording(model, n_frozen, h):
        out = real(model, n_frozen, h)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(engine, "forward_from", recording)
    cfg = make_config(device="cuda", epochs=2)
    session, history = _train(cfg, 2)
    assert engine.CUDA_AUTOCAST_DTYPE in dtypes  # the training forward ran under autocast
    assert all(math.isfinite(v) for m in history for v in (m.train_loss, m.val_loss))
    assert all(p.is_cuda for p in session.state.model.parameters())
    if engine.CUDA_AUTOCAST_DTYPE == torch.float16:
        assert session.state.scaler is not None and session.state.scaler.get_scale() > 0

    for name in (ckpt.LAST, ckpt.BEST):
        state = torch.load(cfg.checkpoints_dir / name, map_location="cpu", weights_only=True)
        assert all(t.device.type == "cpu" for t in state["model"].values())
        if engine.CUDA_AUTOCAST_DTYPE == torch.float16:
            assert state["scaler"]["scale"] > 0
        model = ckpt.load_model_from_checkpoint(state)
        val = session.splits()["val"]
        with torch.no_grad():
            logits = model(normalize(val.images, tuple(state["mean"]), tuple(state["std"])))
        assert torch.isfinite(logits).all() and logits.shape == (len(val), 2)


@gpu
def test_resume_on_cuda_equals_an_uninterrupted_run(make_config, tmp_path, deterministic):
    """2 epochs straight against 1 epoch, then a fresh session (what a new process has) resuming from
    last.pth. With deterministic kernels the runs are the same computation; the tolerance (1e-5
    relative) absorbs only float reordering in an op without a deterministic kernel, far below what a
    state lost in the checkpoint (weights, Adam moments, the grad scaler, the dropout seed) changes."""
    straight_session, straight = _train(make_config(device="cuda", artifacts_dir=str(tmp_path / "straight")), 2)
    cfg = make_config(device="cuda", artifacts_dir=str(tmp_path / "resumed"))
    _train(cfg, 1)
    fresh = TrainingSession(cfg)
    fresh.resume()
    second = fresh.train_epoch(1, progress=False)
    _assert_close_runs(straight[1:], [second])

    a = torch.load(tmp_path / "straight" / "checkpoints" / ckpt.LAST, map_location="cpu", weights_only=True)
    b = torch.load(cfg.checkpoints_dir / ckpt.LAST, map_location="cpu", weights_only=True)
    worst = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"]
                if a["model"][k].numel())
    assert worst <= 1e-5, f"weights after epoch 2 differ by {worst:.2e}"
    assert a.get("scaler") == b.get("scaler")


@gpu
def test_export_parity_from_a_cuda_trained_checkpoint(make_config, tmp_path):
    """The export runs on the CPU from a checkpoint trained on CUDA: TorchScript and ONNX match PyTorch
    within the export's tolerance, and the CPU model matches the same weights on CUDA (float32, no TF32)."""
    from harv_train.reporting import export
    from harv_train.reporting.evaluation import load_eval_split, load_trained_model

    cfg = make_config(device="cuda", epochs=1)
    _train(cfg, 1)
    best = cfg.checkpoints_dir / ckpt.BEST
    result = export.export_checkpoint(best, f"{cfg.data_dir}/val", tmp_path / "export", latency_runs=3)
    assert all(d <= export.TOLERANCE for d in result.parity["max_abs_diff"].values()), result.parity
    assert all(result.parity["same_predictions"].values())

    state, model = load_trained_model(best)
    x = normalize(load_eval_split(state, f"{cfg.data_dir}/val").images, tuple(state["mean"]), tuple(state["std"]))
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            on_cpu = model(x)
            on_cuda = copy.deepcopy(model).cuda()(x.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert float((on_cpu - on_cuda).abs().max()) <= export.TOLERANCE


@gpu
def test_augmentation_gives_the_same_pixels_on_cpu_and_cuda():
    """The same seeded draws on the CPU (image by image) and on CUDA (batched): every augmented pixel
    within 1/255, except where nearest-neighbour rotation meets a tie (counted, at most 0.1%)."""
    x = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    draws = draw_augmentation(len(x), torch.Generator().manual_seed(8))
    on_cpu = apply_augmentation(x, draws, MEAN, STD, torch.channels_last)
    on_cuda = apply_augmentation(x.cuda(), draws, MEAN, STD, torch.channels_last)
    assert on_cuda.is_cuda and on_cuda.is_contiguous(memory_format=torch.channels_last)
    ties = _assert_same_pixels(on_cpu, on_cuda, draws.flip, draws.angle)
    print(f"pixels differing at nearest-neighbour ties: {ties} of {x.shape[0] * 224 * 224}")


def _recorded_augmentation(monkeypatch) -> list:
    batches = []
    real = engine.apply_augmentation

    def record(x, params, *args, **kwargs):
        out = real(x, params, *args, **kwargs)
        batches.append((out.detach().cpu(), params.flip.cpu(), params.angle.cpu()))
        return out

    monkeypatch.setattr(engine, "apply_augmentation", record)
    return batches


@gpu
def test_a_cpu_and_a_cuda_epoch_see_the_same_augmented_pixels(make_config, tmp_path, monkeypatch):
    """What the network gets in one epoch, on the CPU and on CUDA (train split on the GPU): the same order,
    the same draws, the same pixels within 1/255."""
    seen = _recorded_augmentation(monkeypatch)
    _train(make_config(device="cpu", epochs=1, artifacts_dir=str(tmp_path / "cpu")), 1)
    on_cpu = list(seen)
    seen.clear()
    session, _ = _train(make_config(device="cuda", epochs=1, artifacts_dir=str(tmp_path / "cuda")), 1)
    assert session.train_split().images.is_cuda
    assert len(seen) == len(on_cpu) > 1
    for (a, flip, angle), (b, flip_b, angle_b) in zip(on_cpu, seen):
        assert torch.equal(flip, flip_b) and torch.equal(angle, angle_b)
        _assert_same_pixels(a, b, flip, angle)


@gpu
def test_gpu_data_path_keeps_the_train_split_on_the_gpu_and_trains_as_the_host_path(
        make_config, tmp_path, monkeypatch, deterministic):
    """data_on_device (the default): the cached uint8 train images are copied to the GPU once and every
    batch is cut there; the numbers equal those of copying each batch from the host."""
    on_device, host = [], []
    real = engine.DecodedSplit.batches_of

    def recording(split, chunks, num_workers=0):
        for images, labels in real(split, chunks, num_workers):
            (on_device if images.is_cuda and labels.is_cuda else host).append(len(images))
            yield images, labels

    monkeypatch.setattr(engine.DecodedSplit, "batches_of", recording)
    session, gpu_resident = _train(make_config(device="cuda", artifacts_dir=str(tmp_path / "gpu")), 2)
    assert session.train_split().images.is_cuda and not session.splits()["train"].images.is_cuda
    assert sum(on_device) == 2 * len(session.splits()["train"])  # every training batch, both epochs
    on_device.clear()
    _, copied = _train(make_config(device="cuda", artifacts_dir=str(tmp_path / "host")), 2, data_on_device=False)
    assert not on_device
    _assert_close_runs(gpu_resident, copied)


@gpu
def test_sync_batchnorm_on_cuda_trains_two_ranks_as_one(tmp_path, deterministic):
    """distributed.sync_batchnorm on CUDA is torch.nn.SyncBatchNorm: two ranks (nccl with a GPU each,
    gloo sharing one GPU otherwise) give plain BatchNorm's output and gradients on the concatenated
    batch, and train MobileNetV3-Small (dropout off) step for step as one process with the same global batch."""
    from tests import test_sync_batchnorm as sbn

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    ranks = sbn.spawn_ranks(tmp_path, backend=backend, device_type="cuda")
    assert ranks[0]["layer_class"] == "SyncBatchNorm"
    sbn.assert_layer_matches_batchnorm(ranks)
    sbn.assert_synchronized_ranks_train_as_one(ranks, sbn._train_steps(0, 1, sync=False, device=torch.device("cuda", 0)))
