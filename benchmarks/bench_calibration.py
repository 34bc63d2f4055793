"""Temperature scaling on held-out test sets built from real images that ship in installed packages.

    .venv/bin/python benchmarks/bench_calibration.py                 # 2 sets x 3 seeds, 3 epochs
    .venv/bin/python benchmarks/bench_calibration.py --epochs 5 --seeds 0 1 2 3 4

Sets (neither is the demo data):
- digits: scikit-learn's load_digits (1797 handwritten digits, 8x8 grey), upscaled to img_size RGB;
  10 classes; 500 train, 200 val, the other 1097 test.
- photos: which photo a 48x48 crop comes from, for 8 photos of scikit-image and scikit-learn
  (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry, china, flower);
  60 / 20 / 120 crops per photo (480 / 160 / 960); no val or test pixel is seen in training. With
  `--photos-layout cells` (the default) each photo's cells go to the splits at random; with `shift`
  val and test come from the bottom of each photo, training from the top (photo_regions).

Each run trains the seed recipe (efficientnet_lite0, ImageNet weights from its pip package, no
network) with TrainingSession, fits the temperature on val as the flow does (calibrate_checkpoint),
then measures the best checkpoint on the test split: accuracy, NLL and ECE (15 bins) without and with
the temperature. Prints one line per run, mean +- std per set, and one JSON line. `test_ece_floor` is
the ECE a perfectly calibrated model would show on the test images (labels drawn from its own
calibrated probabilities): the noise an ECE of a few hundred images carries.
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
from harv_train.core.calibration import expected_calibration_error, nll  # noqa: E402
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


# crops per photo; the test split is the largest so that its ECE carries little sampling noise
PHOTO_CROPS = {"train": 60, "val": 20, "test": 120}
PHOTO_LAYOUTS = ("cells", "shift")

Region = tuple[int, int, int, int]  # top, bottom, left, right


def photo_regions(h: int, w: int, layout: str, crop: int, rng: np.random.Generator) -> dict[str, list[Region]]:
    """Where each split's crops of one h x w photo come from; the splits share no pixel.
    - cells: the photo cut into (crop + 16)-px cells, shuffled, 60% of them train, 20% val, 20% test:
      the three splits drawn alike, as a random split of one folder is.
    - shift: train from the top 60% of the photo; val and test from the bottom 40%, in columns 2 x crop
      wide that alternate between them: the test is a shift away from training (as new photos can
      be) that val, drawn like test, represents."""
    if layout == "cells":
        size = crop + 16
        cells = [(top, top + size, left, left + size)
                 for top in range(0, h - size + 1, size) for left in range(0, w - size + 1, size)]
        order = [cells[i] for i in rng.permutation(len(cells))]
        n_train, n_val = round(0.6 * len(cells)), round(0.2 * len(cells))
        return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    held_out_top = int(0.6 * h)
    columns = [(held_out_top, h, left, min(left + 2 * crop, w)) for left in range(0, w - crop + 1, 2 * crop)]
    return {"train": [(0, held_out_top, 0, w)], "val": columns[0::2], "test": columns[1::2]}


def build_photos(root: Path, layout: str = "cells", crop: int = 48) -> Path:
    """Which of 8 photos a crop x crop crop comes from; `layout` places the splits (photo_regions)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in
              ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")}
    china, flower = load_sample_images().images
    photos.update(china=china, flower=flower)
    rng = np.random.default_rng(0)
    for name, image in photos.items():
        for split, regions in photo_regions(*image.shape[:2], layout, crop, rng).items():
            for k in range(PHOTO_CROPS[split]):
                top, bottom, left, right = regions[int(rng.integers(len(regions)))]
                y = int(rng.integers(top, bottom - crop + 1))
                x = int(rng.integers(left, right - crop + 1))
                _save(root, split, name, k, np.ascontiguousarray(image[y:y + crop, x:x + crop, :3]))
    return root


SETS = ("digits", "photos")


def build_set(name: str, root: Path, photos_layout: str) -> Path:
    """One of SETS as an ImageFolder with train/, val/ and test/ under root."""
    return build_photos(root, photos_layout) if name == "photos" else build_digits(root)


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
    }


def ece_floor(logits: torch.Tensor, temperature: float, draws: int = 200) -> float:
    """The ECE a perfectly calibrated model would still show on this many images: the mean ECE over
    labels drawn from softmax(logits / T) itself. A measured ECE near it is within sampling noise."""
    probabilities = torch.softmax(logits.double() / temperature, dim=1)
    drawn = torch.multinomial(probabilities, draws, replacement=True, generator=torch.Generator().manual_seed(0))
    return statistics.mean(expected_calibration_error(logits, drawn[:, i], temperature) for i in range(draws))


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--photos-layout", default="cells", choices=PHOTO_LAYOUTS,
                        help="where photos' val and test crops come from (photo_regions)")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="harv-bench-calibration-") as tmp:
        for name in args.sets:
            data = build_set(name, Path(tmp, name, "data"), args.photos_layout)
            results[name] = []
            for seed in args.seeds:
                r = run(data, Path(tmp, name, f"run-{seed}"), seed, args.epochs, args.img_size)
                results[name].append(r)
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items() if k != "seed"), flush=True)
    print(f"\nefficientnet_lite0 (ImageNet), seed recipe, {args.epochs} epochs, {args.img_size} px, seeds {args.seeds}, "
          f"photos layout {args.photos_layout}")
    keys = ("test_acc", "test_acc_calibrated", "test_nll", "test_nll_calibrated", "test_ece", "test_ece_calibrated",
            "temperature")
    for name, runs in results.items():
        print(f"{name} ({runs[0]['test_images']} test images): "
              + "; ".join(f"{k} {mean_std([r[k] for r in runs])}" for k in keys))
        cut = [1 - r["test_ece_calibrated"] / r["test_ece"] for r in runs if r["test_ece"] > 0]
        print(f"  ECE cut by temperature scaling: {mean_std(cut)} (fraction)")
    print(json.dumps({"epochs": args.epochs, "img_size": args.img_size, "photos_layout": args.photos_layout,
                      "results": results}))


if __name__ == "__main__":
    main()
