"""Temperature scaling on held-out test sets built from real images that ship in installed packages.

    .venv/bin/python benchmarks/bench_calibration.py                 # 2 sets x 3 seeds, 3 epochs
    .venv/bin/python benchmarks/bench_calibration.py --epochs 5 --seeds 0 1 2 3 4

Sets (neither is the demo data):
- digits: scikit-learn's load_digits (1797 handwritten digits, 8x8 grey), upscaled to img_size RGB;
  10 classes; 500 train, 200 val, the other 1097 test.
- photos: which photo a 48x48 crop comes from, for 8 photos of scikit-image and scikit-learn
  (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry, china, flower);
  train, val and test crops come from disjoint bands of each photo (top 60%, next 20%, last 20%), so
  no test pixel was seen in training; 60 / 20 / 40 crops per photo.

Each run trains the seed recipe (efficientnet_lite0, ImageNet weights from its pip package, no
network) with TrainingSession, fits the temperature on val as the flow does (calibrate_checkpoint),
then measures the best checkpoint on the test split: accuracy, NLL and ECE (15 bins) without and with
the temperature; and, without the shift between val and test, the ECE on val cross-fitted (T fitted
on alternate val images, scored on the others, both ways). Prints one line per run, mean +- std per
set, and one JSON line. `test_ece_floor` is the ECE a perfectly calibrated model would show on the
test images (labels drawn from its own calibrated probabilities): the noise an ECE of a few hundred
images carries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from harv_train.config import load_config  # noqa: E402
from harv_train.core import checkpoints as ckpt  # noqa: E402
from harv_train.core.calibration import expected_calibration_error, fit_temperature, nll  # noqa: E402
from harv_train.core.session import TrainingSession  # noqa: E402
from harv_train.reporting.evaluation import load_eval_split, load_trained_model, predict_split  # noqa: E402
from harv_train.reporting.post_training import calibrate_checkpoint  # noqa: E402


def _save(folder: Path, split: str, label: str, index: int, pixels: np.ndarray) -> None:
    path = folder / split / label
    path.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path / f"{index:04d}.png")


def build_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    for rank, i in enumerate(order):
        split = "train" if rank < 500 else "val" if rank < 700 else "test"
        grey = (digits.images[i] * (255 / 16)).astype(np.uint8)
        rgb = np.repeat(np.array(Image.fromarray(grey).resize((32, 32), Image.BILINEAR))[..., None], 3, axis=2)
        _save(root, split, f"digit{digits.target[i]}", rank, rgb)
    return root


def build_photos(root: Path, crop: int = 48) -> Path:
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in
              ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")}
    china, flower = load_sample_images().images
    photos.update(china=china, flower=flower)
    rng = np.random.default_rng(0)
    bands = {"train": (0.0, 0.6, 60), "val": (0.6, 0.8, 20), "test": (0.8, 1.0, 40)}
    for name, image in photos.items():
        h, w = image.shape[:2]
        for split, (start, end, count) in bands.items():
            top, bottom = int(start * h), int(end * h) - crop
            for k in range(count):
                y = int(rng.integers(top, max(top + 1, bottom)))
                x = int(rng.integers(0, w - crop))
                _save(root, split, name, k, np.ascontiguousarray(image[y:y + crop, x:x + crop, :3]))
    return root


def run(data: Path, work: Path, seed: int, epochs: int, img_size: int) -> dict[str, float]:
    cfg = load_config(None, {
        "model_name": "efficientnet_lite0", "pretrained": True, "epochs": epochs, "img_size": img_size,
        "seed": seed, "classes": None, "data_dir": str(data), "artifacts_dir": str(work), "num_workers": 0,
        "early_stopping_patience": 0,
    })
    session = TrainingSession(cfg)
    session.start(None)
    for epoch in range(epochs):
        session.train_epoch(epoch, progress=False)
    _, scores = calibrated_test_scores(cfg.checkpoints_dir / ckpt.BEST, session.splits()["val"], data / "test")
    return {"seed": seed, **scores}


def calibrated_test_scores(best: Path, val, test_dir: Path) -> tuple[dict, dict[str, float]]:
    """Fit the temperature of `best` on `val` as the flow does (calibrate_checkpoint), then score it on
    `test_dir` without and with it; returns (the checkpoint, the scores)."""
    fit = calibrate_checkpoint(best, val)
    state, model = load_trained_model(best)
    test = load_eval_split(state, test_dir)
    predictions = predict_split(model, test, state["mean"], state["std"])
    logits, labels = torch.from_numpy(predictions.logits), torch.from_numpy(predictions.labels)
    t = float(state["temperature"])
    return state, {
        "temperature": t, "test_images": len(labels),
        "test_acc": float((logits.argmax(1) == labels).double().mean()),
        "test_acc_calibrated": float(((logits / t).argmax(1) == labels).double().mean()),
        "test_nll": nll(logits, labels), "test_nll_calibrated": nll(logits, labels, t),
        "test_ece": expected_calibration_error(logits, labels),
        "test_ece_calibrated": expected_calibration_error(logits, labels, t),
        "test_ece_floor": ece_floor(logits, t),
        "val_ece": fit.ece_before, "val_ece_calibrated": fit.ece_after,
        **crossfit_val_ece(model, val, state),
    }


def ece_floor(logits: torch.Tensor, temperature: float, draws: int = 200) -> float:
    """The ECE a perfectly calibrated model would still show on this many images: the mean ECE over
    labels drawn from softmax(logits / T) itself. A measured ECE near it is within sampling noise."""
    probabilities = torch.softmax(logits.double() / temperature, dim=1)
    drawn = torch.multinomial(probabilities, draws, replacement=True, generator=torch.Generator().manual_seed(0))
    return statistics.mean(expected_calibration_error(logits, drawn[:, i], temperature) for i in range(draws))


def crossfit_val_ece(model, val, state: dict) -> dict[str, float]:
    """ECE on val without the shift between val and test: T fitted on one half of val (alternate
    images) and scored on the other, both ways, averaged; the raw ECE on the same halves beside it."""
    predictions = predict_split(model, val, state["mean"], state["std"])
    logits, labels = torch.from_numpy(predictions.logits), torch.from_numpy(predictions.labels)
    halves = [torch.arange(i, len(labels), 2) for i in (0, 1)]
    before, after = [], []
    for fit_on, score_on in (halves, halves[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        before.append(expected_calibration_error(logits[score_on], labels[score_on]))
        after.append(expected_calibration_error(logits[score_on], labels[score_on], t))
    return {"val_crossfit_ece": statistics.mean(before), "val_crossfit_ece_calibrated": statistics.mean(after)}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--sets", nargs="+", default=["digits", "photos"], choices=["digits", "photos"])
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="harv-bench-calibration-") as tmp:
        for name in args.sets:
            data = {"digits": build_digits, "photos": build_photos}[name](Path(tmp, name, "data"))
            results[name] = []
            for seed in args.seeds:
                r = run(data, Path(tmp, name, f"run-{seed}"), seed, args.epochs, args.img_size)
                results[name].append(r)
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items() if k != "seed"), flush=True)
    print(f"\nefficientnet_lite0 (ImageNet), seed recipe, {args.epochs} epochs, {args.img_size} px, seeds {args.seeds}")
    keys = ("test_acc", "test_acc_calibrated", "test_nll", "test_nll_calibrated", "test_ece", "test_ece_calibrated",
            "temperature")
    for name, runs in results.items():
        print(f"{name} ({runs[0]['test_images']} test images): "
              + "; ".join(f"{k} {mean_std([r[k] for r in runs])}" for k in keys))
        cut = [1 - r["test_ece_calibrated"] / r["test_ece"] for r in runs if r["test_ece"] > 0]
        print(f"  ECE cut by temperature scaling: {mean_std(cut)} (fraction)")
    print(json.dumps({"epochs": args.epochs, "img_size": args.img_size, "results": results}))


if __name__ == "__main__":
    main()
