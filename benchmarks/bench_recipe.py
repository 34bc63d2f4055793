"""`recipe: seed` against `recipe: modern` (or any other set of params) on two held-out sets of real images.

    .venv/bin/python benchmarks/bench_recipe.py                              # seed vs modern, 2 sets x 3 seeds
    .venv/bin/python benchmarks/bench_recipe.py --epochs 8 --seeds 0 1 2 3 4
    .venv/bin/python benchmarks/bench_recipe.py --candidate "lowfreeze:freeze_ratio=0.3,backbone_lr_mult=0.1"

The sets are benchmarks/bench_calibration.py's (neither is the demo data): `digits` (scikit-learn's
handwritten digits, 500 train / 200 val / 1097 test) and `photos` (which of 8 photos shipped by
scikit-image and scikit-learn a 48x48 crop comes from; 480 / 160 / 960; `--photos-layout cells`, the
default, splits each photo's cells at random, `shift` takes val and test from the bottom of each photo,
away from the training crops). Every run: efficientnet_lite0 with its ImageNet weights (from its pip
package), the same epochs, img_size 64, num_workers 0, early stopping off; the best checkpoint (by val
accuracy) is then temperature-calibrated on val as the flow does and measured on the test split.

Reports per set and recipe, mean +- std over the seeds: test accuracy, test NLL, test ECE before and
after temperature scaling, and the mean train time per epoch; then each candidate against the first
(accuracy in points, NLL as a fraction, epoch time as a ratio measured side by side in this run).
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_calibration import PHOTO_LAYOUTS, SETS, build_set, calibrated_test_scores, mean_std  # noqa: E402
from harv_train.config import load_config, parse_override  # noqa: E402
from harv_train.core import checkpoints as ckpt  # noqa: E402
from harv_train.core.session import TrainingSession  # noqa: E402


def run(data: Path, work: Path, seed: int, epochs: int, img_size: int, overrides: dict) -> dict[str, float]:
    cfg = load_config(None, {
        "model_name": "efficientnet_lite0", "pretrained": True, "epochs": epochs, "img_size": img_size,
        "seed": seed, "classes": None, "data_dir": str(data), "artifacts_dir": str(work), "num_workers": 0,
        "early_stopping_patience": 0, **overrides,
    })
    session = TrainingSession(cfg)
    session.start(None)
    history = [session.train_epoch(epoch, progress=False) for epoch in range(cfg.epochs)]
    state, scores = calibrated_test_scores(cfg.checkpoints_dir / ckpt.BEST, session.splits()["val"], data / "test")
    return {"seed": seed, "best_epoch": state["best_epoch"], **scores,
            "epoch_time_s": statistics.mean(m.train_time_s for m in history)}


def mean_of(runs: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def parse_candidate(text: str) -> tuple[str, dict]:
    """`name:key=value,key=value` (values parsed as YAML, as --set does)."""
    name, _, assignments = text.partition(":")
    overrides = dict(parse_override(a) for a in assignments.split(",") if a)
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--photos-layout", default="cells", choices=PHOTO_LAYOUTS,
                        help="where photos' val and test crops come from (bench_calibration.photo_regions)")
    parser.add_argument("--candidate", action="append", default=[],
                        help="NAME:KEY=VALUE,... (repeatable); default: seed:recipe=seed and modern:recipe=modern")
    args = parser.parse_args()
    candidates = [parse_candidate(c) for c in args.candidate] or [("seed", {"recipe": "seed"}),
                                                                   ("modern", {"recipe": "modern"})]
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="harv-bench-recipe-") as tmp:
        for set_name in args.sets:
            data = build_set(set_name, Path(tmp, set_name, "data"), args.photos_layout)
            results[set_name] = {name: [] for name, _ in candidates}
            for seed in args.seeds:  # the candidates of one seed side by side: their epoch times compare
                for name, overrides in candidates:
                    r = run(data, Path(tmp, set_name, f"{name}-{seed}"), seed, args.epochs, args.img_size, overrides)
                    results[set_name][name].append(r)
                    print(f"{set_name} {name} seed {seed}: " + ", ".join(
                        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "seed"),
                        flush=True)
    print(f"\nefficientnet_lite0 (ImageNet), {args.epochs} epochs, {args.img_size} px, seeds {args.seeds}, "
          f"photos layout {args.photos_layout}")
    for name, overrides in candidates:
        print(f"  {name}: {overrides}")
    keys = ("test_acc", "test_nll", "test_nll_calibrated", "test_ece", "test_ece_calibrated", "test_ece_floor",
            "epoch_time_s")
    comparison: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, by_name in results.items():
        base_name = candidates[0][0]
        base = by_name[base_name]
        for name, runs in by_name.items():
            print(f"{set_name} {name}: " + "; ".join(f"{k} {mean_std([r[k] for r in runs])}" for k in keys))
            ece_cut = 1 - mean_of(runs, "test_ece_calibrated") / mean_of(runs, "test_ece")
            print(f"  {name}: temperature scaling cut the mean test ECE by {100 * ece_cut:.0f}%")
            if name == base_name:
                continue
            comparison.setdefault(set_name, {})[name] = {
                "test_acc_points": 100 * (mean_of(runs, "test_acc") - mean_of(base, "test_acc")),
                "test_nll_change": mean_of(runs, "test_nll") / mean_of(base, "test_nll") - 1,
                # The NLL of what predict, the exports and the MLflow model serve: each recipe with its own T.
                "test_nll_calibrated_change":
                    mean_of(runs, "test_nll_calibrated") / mean_of(base, "test_nll_calibrated") - 1,
                "epoch_time_ratio": mean_of(runs, "epoch_time_s") / mean_of(base, "epoch_time_s"),
            }
            c = comparison[set_name][name]
            print(f"  {name} vs {base_name}: test accuracy {c['test_acc_points']:+.2f} points, test NLL "
                  f"{100 * c['test_nll_change']:+.1f}% ({100 * c['test_nll_calibrated_change']:+.1f}% with T), "
                  f"epoch time x{c['epoch_time_ratio']:.2f}")
    print(json.dumps({"epochs": args.epochs, "img_size": args.img_size, "seeds": args.seeds,
                      "photos_layout": args.photos_layout,
                      "candidates": dict(candidates), "comparison": comparison, "results": results}))


if __name__ == "__main__":
    main()
