"""Honest numbers on a real held-out dataset: the best-val vs test accuracy gap, and class imbalance.

    .venv/bin/python benchmarks/bench_holdout.py [--seeds 0 1 2] [--epochs 4] [--img-size 64]

The data is scikit-learn's `load_digits` (1797 real 8x8 scans of handwritten digits 0-9, shipped
inside the package: no download), upscaled to 64 px PNGs in one folder of class folders, split by
`val_fraction: 0.2`, `test_fraction: 0.2` (harv_train/core/splits.py; seed 0 for the split, so every
training seed sees the same test images). Trains efficientnet_lite0 (its ImageNet weights ship in a
package) with the project's own session, without Prefect or MLflow, then evaluates best_model.pth
on val and on test with the project's report (harv_train/reporting/evaluation.py).

1. Gap: for each seed, best val accuracy (what the run reports) minus test accuracy.
2. Imbalance: class "0" of the train split cut to a fifth of its images (val and test untouched),
   trained plain and with `class_weights: balanced` + `sampler: balanced`; recall of "0" on test.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_digits(root: Path, size: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def as_folders(flat: Path, out: Path, cut_class: str | None = None, keep_fraction: float = 1.0) -> Path:
    """The made split (seed 0) written out as train/ val/ test/ folders (symlinks), train's `cut_class`
    cut to `keep_fraction` of its images."""
    from harv_train.core.data import scan_dataset

    indexes = scan_dataset(flat, None, val_fraction=0.2, test_fraction=0.2, seed=0)
    for split, index in indexes.items():
        samples = index.samples
        if split == "train" and cut_class is not None:
            label = index.classes.index(cut_class)
            ours = [s for s in samples if s[1] == label]
            keep = set(p for p, _ in ours[: max(1, round(len(ours) * keep_fraction))])
            samples = [s for s in samples if s[1] != label or s[0] in keep]
        for path, label in samples:
            target = out / split / index.classes[label] / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return out


def train_and_test(data: Path, artifacts: Path, seed: int, epochs: int, img_size: int, **options) -> dict:
    from harv_train.config import load_config
    from harv_train.core import checkpoints as ckpt
    from harv_train.core.session import TrainingSession
    from harv_train.reporting.evaluation import evaluate_checkpoint

    cfg = load_config(None, {"model_name": "efficientnet_lite0", "pretrained": True, "epochs": epochs,
                             "batch_size": 32, "img_size": img_size, "lr": 0.001, "classes": None, "seed": seed,
                             "data_dir": str(data), "artifacts_dir": str(artifacts), "num_workers": 0,
                             "export": False, "early_stopping_patience": 0, **options})
    session = TrainingSession(cfg)
    session.start(None)
    history = [session.train_epoch(e, progress=False) for e in range(epochs)]
    best = cfg.checkpoints_dir / ckpt.BEST
    test = evaluate_checkpoint(best, data / "test", artifacts / "test", split=session.splits()["test"], split_label="test")
    return {"best_val_acc": max(h.val_acc for h in history if h.is_best), "test_acc": test.metrics.accuracy,
            "test_recall": {c.name: c.recall for c in test.metrics.per_class}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--skip", choices=["gap", "imbalance"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="harv-bench-holdout-"))
    os.environ.setdefault("HARV_TRAIN_CACHE_DIR", str(work / "cache"))
    os.environ.setdefault("HARV_TRAIN_OFFLINE", "1")
    try:
        flat = write_digits(work / "digits", args.img_size)
        result: dict = {"seeds": args.seeds, "epochs": args.epochs, "img_size": args.img_size}
        if args.skip != "gap":
            data = as_folders(flat, work / "split")
            gaps = []
            for seed in args.seeds:
                r = train_and_test(data, work / f"gap-{seed}", seed, args.epochs, args.img_size)
                gaps.append({"seed": seed, "best_val_acc": r["best_val_acc"], "test_acc": r["test_acc"],
                             "gap": r["best_val_acc"] - r["test_acc"]})
                print(f"seed {seed}: best val {r['best_val_acc']:.4f}, test {r['test_acc']:.4f}, "
                      f"gap {r['best_val_acc'] - r['test_acc']:+.4f}", flush=True)
            result["gap"] = gaps
        if args.skip != "imbalance":
            data = as_folders(flat, work / "cut", cut_class="0", keep_fraction=0.2)
            rows = {}
            for name, options in (("plain", {}), ("balanced", {"class_weights": "balanced", "sampler": "balanced"})):
                r = train_and_test(data, work / f"imb-{name}", args.seeds[0], args.epochs, args.img_size, **options)
                rows[name] = {"recall_0": r["test_recall"]["0"], "test_acc": r["test_acc"]}
                print(f"class 0 cut to a fifth, {name}: test recall of 0 {r['test_recall']['0']:.4f}, "
                      f"test accuracy {r['test_acc']:.4f}", flush=True)
            result["imbalance"] = rows
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
