"""Epoch speed on a GPU: harv-train's own epoch, the data already decoded, fp16 against bf16 autocast.

    python3 benchmarks/bench_gpu.py --json bench_gpu.json             # the full matrix, about 3 minutes on an H200
    python3 benchmarks/bench_gpu.py --device cpu --sizes 64 --img-size 64 --batch-sizes 16 --epochs 1   # a dry run

Each configuration is a fresh `TrainingSession` (random init: `pretrained: false`, nothing is
downloaded) over photo-like images made as tensors (crops of scikit-image's sample photos, one photo
per class, with flips, gain and noise), handed to the session as its decoded, cached splits. By default
the train split is copied to the GPU once (the session's GPU data path); `data: host` rows copy each batch
from host memory instead. One warm-up epoch, then `--epochs` timed epochs (medians reported):

- train_s: the training pass of `TrainingSession.train_epoch` (augmentation, forward, backward, step;
  it ends by reading the loss back, so the GPU has finished); images_per_s = train images / train_s.
- epoch_s: the whole `train_epoch` call: training, validation on the frozen features and the
  checkpoint commit (best and last.pth, written to disk).
- nvml_util_pct: NVML's "GPU busy" (percent of time a kernel ran), sampled every 20 ms during the
  timed training passes; its own sample period is 1/6 s to 1 s, so it means little for passes under 2 s.
- gpu_busy_pct (1,000-image rows): one more training pass under torch.profiler (CUDA activity only):
  the union of kernel, copy and set intervals over the pass's wall time. The profiler slows the CPU side,
  so this is a lower bound; gpu_busy_est_pct divides the same kernel time by the unprofiled train_s.

Rows run in order of importance and stop at `--budget-s` (later rows say "skipped: time budget").
The last line printed is the JSON summary, or with --json, where it went (rewritten after every row)
and the conclusions.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HARV_TRAIN_OFFLINE", "1")  # random init everywhere: nothing may be downloaded

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from harv_train.config import load_config  # noqa: E402
from harv_train.core.augment import normalize  # noqa: E402
from harv_train.core import session as session_module  # noqa: E402
from harv_train.core.data import DecodedSplit  # noqa: E402
from harv_train.core.models import model_spec  # noqa: E402
from harv_train.core.session import TrainingSession  # noqa: E402

V100_SEED_EPOCH_S = 12.0  # the seed's GPU figure: a V100, 1,000 images, MobileNetV3, one epoch
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- data ------------------------------------------------------------------------------------------------


def _photos(size: int) -> torch.Tensor:
    """[P, 3, size, size] float 0-255: scikit-image's bundled sample photos (or smooth noise without it)."""
    try:
        import numpy as np
        import skimage.data as sk

        raw = [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), sk.camera(), sk.brick(), sk.grass(),
               sk.gravel()]
        photos = []
        for p in raw:
            p = np.stack([p] * 3, -1) if p.ndim == 2 else p[..., :3]
            t = torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1).float().unsqueeze(0)
            photos.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
        return torch.cat(photos)
    except Exception:  # any failure here only changes what the pixels look like
        g = torch.Generator().manual_seed(0)
        return F.interpolate(torch.rand(8, 3, 16, 16, generator=g) * 255, size=(size, size), mode="bicubic").clamp(0, 255)


def synthetic_split(n: int, img_size: int, classes: int, seed: int, device: torch.device) -> DecodedSplit:
    """n photo-like uint8 images (class = source photo; random crop, flip, gain, noise) as a cached split
    on the CPU, as decoding would leave it. Made on `device` in chunks, which is fast on a GPU."""
    margin = max(8, img_size // 8)
    photos = _photos(img_size + margin).to(device)
    classes = min(classes, len(photos))
    g = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(n, device=device) % classes
    labels = labels[torch.randperm(n, generator=g, device=device)]
    images = torch.empty(n, 3, img_size, img_size, dtype=torch.uint8)
    ar = torch.arange(img_size, device=device)
    for start in range(0, n, 500):
        lab = labels[start : start + 500]
        b = len(lab)
        dy = torch.randint(0, margin + 1, (b,), generator=g, device=device)
        dx = torch.randint(0, margin + 1, (b,), generator=g, device=device)
        rows = (dy.view(b, 1) + ar).view(b, 1, img_size, 1)
        cols = (dx.view(b, 1) + ar).view(b, 1, 1, img_size)
        x = photos[lab.view(b, 1, 1, 1), torch.arange(3, device=device).view(1, 3, 1, 1), rows, cols]
        flip = torch.rand(b, generator=g, device=device) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        gain = 0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=g, device=device)
        x = x * gain + 8 * torch.randn(x.shape, generator=g, device=device)
        images[start : start + b] = x.clamp_(0, 255).round_().to(torch.uint8).cpu()
    names = [f"class{c}" for c in range(classes)]
    return DecodedSplit(classes=names, paths=[Path(f"synthetic/{i:05d}.png") for i in range(n)],
                        labels=labels.cpu(), images=images, img_size=img_size, interpolation="bilinear")


def calibrate_batchnorm(model: nn.Module, split: DecodedSplit, pipeline, images: int = 256) -> None:
    """Every BatchNorm's running statistics from `images` training images, as pretrained weights have them.

    With random init they are mean 0 and variance 1, so the frozen blocks (eval mode) pass on activations
    that shrink towards zero, in float16 to exact zeros: the network would compute on (near) zeros, which
    runs unlike real data. Here no ImageNet weights can be had (no network on the GPU machine)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for x, _ in split.batches(torch.arange(min(images, len(split))), 64):
            model(normalize(x.to(pipeline.device), pipeline.mean, pipeline.std, pipeline.memory_format))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


class InMemorySession(TrainingSession):
    """A TrainingSession whose decoded splits are given, not read from data_dir."""

    def __init__(self, cfg, splits: dict[str, DecodedSplit], **kwargs):
        super().__init__(cfg, **kwargs)
        self._given = splits

    def splits(self) -> dict[str, DecodedSplit]:
        return self._given


# --- GPU busy ----------------------------------------------------------------------------------------------


class NvmlSampler:
    """NVML's utilization.gpu every `period` s, with wall-clock stamps, in a thread."""

    def __init__(self, device_index: int, period: float = 0.02):
        self.samples: list[tuple[float, int]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self._read()
        except Exception as exc:  # no nvidia-ml-py, no driver, a VM without NVML: the figure is missing, not fatal
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.samples.append((time.time(), int(self._read())))
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                return

    def mean_over(self, windows: list[tuple[float, float]], settle: float = 0.2) -> float | None:
        """Mean utilization of the samples inside the windows (after `settle` s: a reading covers the
        period before it)."""
        values = [u for t, u in self.samples if any(a + settle <= t <= b for a, b in windows)]
        return round(statistics.mean(values), 1) if len(values) >= 3 else None

    def stop(self) -> None:
        self._stop.set()


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _device_intervals_us(prof) -> tuple[list[tuple[float, float]], dict[str, int]]:
    """(start, end) in µs of every kernel, copy and set the profiler saw on the GPU, and how many of each
    kind. Synchronization records on the GPU's timeline are waits, not work: left out."""
    from torch.autograd import DeviceType

    out, kinds = [], {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != DeviceType.CUDA:
            continue
        kind = e.activity_type() if hasattr(e, "activity_type") else "?"
        if any(w in f"{kind} {e.name()}".lower() for w in ("sync", "wait")):
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
        if hasattr(e, "start_ns"):
            end = e.end_ns() if hasattr(e, "end_ns") else e.start_ns() + e.duration_ns()
            out.append((e.start_ns() / 1000, end / 1000))
        else:
            out.append((e.start_us(), e.start_us() + e.duration_us()))
    return out, kinds


# --- one configuration ---------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    images: int
    dtype: str
    batch_size: int
    data: str = "gpu"  # gpu: the train split copied to the device once; host: each batch copied
    cudnn_benchmark: bool = False
    profile: bool = False

    def name(self) -> str:
        extra = ", cudnn.benchmark" if self.cudnn_benchmark else ""
        return f"{self.model} {self.images} img {self.dtype} batch {self.batch_size} data {self.data}{extra}"


class TrainPassTimer:
    """Wraps the session's train_one_epoch: wall-clock windows of each training pass, and a profile of
    the one asked for."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.windows: list[tuple[float, float]] = []
        self.profile_next = False
        self.profile: dict[str, Any] | None = None
        self._real = session_module.train_one_epoch

    def __enter__(self):
        session_module.train_one_epoch = self
        return self

    def __exit__(self, *exc):
        session_module.train_one_epoch = self._real

    def __call__(self, *args, **kwargs):
        if not (self.profile_next and self.cuda):
            start = time.time()
            result = self._real(*args, **kwargs)
            self.windows.append((start, time.time()))
            return result
        self.profile_next = False
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            result = self._real(*args, **kwargs)  # ends by reading the loss: the GPU is done
            wall_us = (time.perf_counter() - start) * 1e6
        try:
            intervals, kinds = _device_intervals_us(prof)
            self.profile = {"wall_s": wall_us / 1e6, "kernel_s": _union_us(intervals) / 1e6, "device_events": kinds}
        except Exception as exc:
            self.profile = {"error": f"{type(exc).__name__}: {exc}"}
        return result


def run_row(row: Row, data: dict[int, dict[str, DecodedSplit]], args, work: Path, nvml: NvmlSampler | None) -> dict:
    device = torch.device(args.device)
    cfg = load_config(None, {
        "model_name": row.model, "pretrained": False, "img_size": args.img_size, "batch_size": row.batch_size,
        "epochs": args.epochs + 2, "classes": None, "data_dir": str(work), "device": args.device,
        "artifacts_dir": str(work / row.name().replace(" ", "_").replace(",", "")),
        "early_stopping_patience": 0, "export": False, "seed": 42,
    })
    torch.backends.cudnn.benchmark = row.cudnn_benchmark
    out: dict[str, Any] = {"model": row.model, "images": row.images, "dtype": row.dtype, "batch_size": row.batch_size,
                           "data": row.data, "cudnn_benchmark": row.cudnn_benchmark}
    start = time.perf_counter()
    session = InMemorySession(cfg, data[row.images], data_on_device=row.data == "gpu")
    session.pipeline.amp_dtype = DTYPES[row.dtype]
    session.start(None)
    calibrate_batchnorm(session.state.model, data[row.images]["train"], session.pipeline)
    if row.dtype != "float16":
        session.state.scaler = None  # only float16 needs loss scaling
    session.train_split()  # the one copy to the GPU (data: gpu)
    _sync(device)
    out["setup_s"] = round(time.perf_counter() - start, 3)

    timer = TrainPassTimer(device)
    with timer:
        metrics, walls = [], []
        for epoch in range(args.epochs + 1 + (1 if row.profile else 0)):
            timer.profile_next = row.profile and epoch == args.epochs + 1
            t = time.perf_counter()
            m = session.train_epoch(epoch, progress=False)
            walls.append(time.perf_counter() - t)
            metrics.append(m)
    timed = slice(1, args.epochs + 1)  # epoch 0 warms up (kernel loads, cuDNN heuristics, val features)
    train_s = statistics.median(m.train_time_s for m in metrics[timed])
    epoch_s = statistics.median(walls[timed])
    val_s = statistics.median(m.val_time_s for m in metrics[timed])
    out.update({
        "train_s": round(train_s, 4), "images_per_s": round(row.images / train_s, 1),
        "epoch_s": round(epoch_s, 4), "val_s": round(val_s, 4),
        "commit_s": round(epoch_s - train_s - val_s, 4),
        "train_s_each": [round(m.train_time_s, 4) for m in metrics[timed]],
        "warmup_epoch_s": round(walls[0], 3),
        "train_loss": [round(m.train_loss, 4) for m in metrics], "val_acc": [round(m.val_acc, 4) for m in metrics],
        "val_images": len(data[row.images]["val"]),
    })
    if nvml is not None and nvml.error is None:
        out["nvml_util_pct"] = nvml.mean_over(timer.windows[timed])
    if timer.profile is not None:
        p = timer.profile
        if "error" in p:
            out["profile_error"] = p["error"]
        else:
            out["gpu_busy_pct"] = round(100 * p["kernel_s"] / p["wall_s"], 1)
            out["gpu_busy_est_pct"] = round(min(100.0, 100 * p["kernel_s"] / train_s), 1)
            out["profiled_train_s"] = round(p["wall_s"], 4)
            out["kernel_s"] = round(p["kernel_s"], 4)
            out["device_events"] = p["device_events"]
    if not all(math.isfinite(m.train_loss) for m in metrics):
        out["warning"] = "non-finite training loss"
    del session
    gc.collect()
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.backends.cudnn.benchmark = False
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the matrix --------------------------------------------------------------------------------------------


def plan(models: list[str], sizes: list[int], dtypes: list[str], batch_sizes: list[int]) -> list[Row]:
    """Most important first: the issue's rows (default batch, data on the GPU, every model, size and
    dtype), then what explains them (the host data path, a GPU-sized batch, cuDNN's autotuner)."""
    first_batch, small, large = batch_sizes[0], min(sizes), max(sizes)
    rows = [Row(m, n, d, first_batch, profile=n == small) for n in sorted(sizes) for m in models for d in dtypes]
    rows.append(Row(models[0], large, dtypes[0], first_batch, data="host"))
    rows += [Row(m, large, d, b) for b in batch_sizes[1:] for m in models for d in dtypes]
    rows += [Row(m, small, d, b, profile=True) for b in batch_sizes[1:] for m in models for d in dtypes[:1]]
    rows.append(Row(models[0], small, dtypes[0], first_batch, cudnn_benchmark=True, profile=True))
    unique: dict[tuple, Row] = {}  # with one size, some rows come twice: once, profiled if either was
    for row in rows:
        key = (row.model, row.images, row.dtype, row.batch_size, row.data, row.cudnn_benchmark)
        unique.setdefault(key, row).profile |= row.profile
    return list(unique.values())


def conclusions(rows: list[dict]) -> dict[str, Any]:
    ok = [r for r in rows if "train_s" in r]

    def find(**want):
        return next((r for r in ok if all(r.get(k) == v for k, v in want.items())), None)

    out: dict[str, Any] = {}
    head = find(model="mobilenet_v3_small", images=1000, dtype="float16", data="gpu", cudnn_benchmark=False)
    if head is not None:
        out["mobilenet_v3_small_1000_train_s"] = head["train_s"]
        out["mobilenet_v3_small_1000_epoch_s"] = head["epoch_s"]
        out["goal_under_0.5s"] = head["train_s"] < 0.5
        out["speedup_vs_v100_seed_12s"] = round(V100_SEED_EPOCH_S / head["epoch_s"], 1)
        out["goal_24x_v100"] = V100_SEED_EPOCH_S / head["epoch_s"] >= 24
    busy = [r.get("gpu_busy_est_pct") for r in ok if r.get("gpu_busy_est_pct") is not None]
    if busy:
        out["gpu_busy_est_pct_range"] = [min(busy), max(busy)]
    # bf16 against fp16, same everything else: ratio of train_s (below 1: bf16 faster).
    ratios = {}
    for r in ok:
        if r["dtype"] != "bfloat16" or r["cudnn_benchmark"]:
            continue
        fp16 = find(model=r["model"], images=r["images"], dtype="float16", batch_size=r["batch_size"],
                    data=r["data"], cudnn_benchmark=False)
        if fp16 is not None:
            ratios[f"{r['model']} {r['images']} batch {r['batch_size']}"] = round(r["train_s"] / fp16["train_s"], 3)
    if ratios:
        out["bf16_over_fp16_train_s"] = ratios
        geo = math.exp(statistics.mean(math.log(v) for v in ratios.values()))
        out["bf16_vs_fp16_winner"] = "bfloat16" if geo < 0.97 else "float16" if geo > 1.03 else "tie (within 3%)"
    host = find(model="mobilenet_v3_small", data="host")
    if host is not None:
        same = find(model=host["model"], images=host["images"], dtype=host["dtype"], batch_size=host["batch_size"],
                    data="gpu", cudnn_benchmark=False)
        if same is not None:
            out["gpu_data_path_speedup"] = round(host["train_s"] / same["train_s"], 2)
    tuned = find(cudnn_benchmark=True)
    if tuned is not None:
        same = find(model=tuned["model"], images=tuned["images"], dtype=tuned["dtype"],
                    batch_size=tuned["batch_size"], data=tuned["data"], cudnn_benchmark=False)
        if same is not None:
            out["cudnn_benchmark_speedup"] = round(same["train_s"] / tuned["train_s"], 2)
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_cores": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count})
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="mobilenet_v3_small,efficientnet_b0")
    parser.add_argument("--sizes", default="1000,10000", help="train images per configuration")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="autocast dtypes (float32: none)")
    parser.add_argument("--batch-sizes", default="16,128", help="the first is the one every row uses (params.yaml's)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row, after one warm-up epoch")
    parser.add_argument("--budget-s", type=float, default=200, help="no new row starts after this many seconds")
    parser.add_argument("--json", help="write the summary here too")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device (torch.cuda.is_available() is False); --device cpu for a dry run")
    models = args.models.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for m in models:
        model_spec(m)  # an unknown model fails here, not after minutes

    summary: dict[str, Any] = {"benchmark": "bench_gpu", "environment": environment(device), "img_size": args.img_size,
                               "timed_epochs": args.epochs, "rows": []}
    data: dict[int, dict[str, DecodedSplit]] = {}
    t = time.perf_counter()
    for n in sizes:
        data[n] = {"train": synthetic_split(n, args.img_size, 10, seed=n, device=device),
                   "val": synthetic_split(max(100, n // 10), args.img_size, 10, seed=n + 1, device=device)}
    summary["data_generation_s"] = round(time.perf_counter() - t, 2)
    print(f"bench_gpu: data made in {summary['data_generation_s']} s: "
          + ", ".join(f"{n} train + {len(d['val'])} val" for n, d in data.items()), flush=True)

    nvml = NvmlSampler(device.index or 0) if device.type == "cuda" else None
    if nvml is not None and nvml.error:
        summary["nvml_error"] = nvml.error
    with tempfile.TemporaryDirectory(prefix="harv-bench-gpu-") as tmp:
        for row in plan(models, sizes, dtypes, batch_sizes):
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                summary["rows"].append({**row.__dict__, "status": f"skipped: time budget ({elapsed:.0f} s)"})
                print(f"{row.name()}: skipped (time budget)", flush=True)
                continue
            try:
                result = run_row(row, data, args, Path(tmp), nvml)
                result["status"] = "ok"
            except Exception as exc:  # one failing row must not cost the others
                result = {**row.__dict__, "status": f"error: {type(exc).__name__}: {str(exc)[:300]}"}
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            summary["rows"].append(result)
            if args.json:  # after every row: a run cut short still leaves what it measured
                Path(args.json).write_text(json.dumps(summary, indent=1))
            if "train_s" in result:
                print(f"{row.name()}: train {result['train_s']:.3f} s ({result['images_per_s']:.0f} img/s), "
                      f"epoch {result['epoch_s']:.3f} s, GPU busy {result.get('gpu_busy_pct', '-')}% profiled "
                      f"({result.get('gpu_busy_est_pct', '-')}% est), NVML {result.get('nvml_util_pct', '-')}%",
                      flush=True)
            else:
                print(f"{row.name()}: {result['status']}", flush=True)
    if nvml is not None:
        nvml.stop()
    summary["conclusions"] = conclusions(summary["rows"])
    summary["total_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
        print(f"bench_gpu: {len(summary['rows'])} rows in {summary['total_s']} s -> {args.json}; "
              + json.dumps(summary["conclusions"]))
    else:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
