"""Evaluate a checkpoint on an ImageFolder split and write the report to a directory.

`evaluate_checkpoint(checkpoint, data_dir, out_dir)` is the whole thing: load and check the
checkpoint and the folder, run the model once over every image (no augmentation), compute the
metrics, and write

    report.json            accuracy, loss, per-class metrics, averages, confusion matrix, worst images
    per_class.csv          precision / recall / F1 / support per class, then macro and weighted avg
    confusion_matrix.csv   counts, rows = true class, columns = predicted class
    worst_images.csv       the highest-loss images: where label errors hide
    learning_curves.png    from the checkpoint's per-epoch history
    confusion_matrix.png   counts and row-normalized
    worst_images.png       contact sheet of the highest-loss images
    reliability.png        reliability diagram (15 confidence bins), before and after the checkpoint's
                           temperature when it has one

No Prefect, no MLflow: the flows wrap this and log the files.
"""

from __future__ import annotations

import logging
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from harv_train.core import checkpoints as ckpt
from harv_train.core.augment import normalize
from harv_train.core.calibration import expected_calibration_error, nll, reliability_bins
from harv_train.core.data import DecodedSplit, decode_split, scan_split
from harv_train.errors import CheckpointError, DataError
from harv_train.reporting.metrics import ClassificationMetrics, classification_metrics
from harv_train.core.checkpoints import load_model_from_checkpoint

logger = logging.getLogger(__name__)

# What evaluation, export and predict need beyond the keys every checkpoint has.
MODEL_KEYS = ("model_name", "img_size", "mean", "std", "interpolation")
WORST_IMAGES = 16


def load_trained_model(path: str | Path) -> tuple[dict[str, Any], nn.Module]:
    """A harv-train checkpoint and its model in eval mode; one-line CheckpointError otherwise."""
    state = ckpt.load_checkpoint(path)
    missing = [k for k in MODEL_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is damaged or from another version")
    try:
        model = load_model_from_checkpoint(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"the weights in {path} do not fit {state['model_name']} ({first[:120]}): the file is damaged"
        ) from None
    return state, model


def _folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_class_folders(data_dir: Path, classes: Sequence[str]) -> None:
    """The folder must hold exactly the checkpoint's class folders (the model knows no others)."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} does not exist: pass a folder with one subfolder of images per class")
    found = _folders(data_dir)
    if not found:
        raise DataError(f"{data_dir} has no class folders: it must hold one folder of images per class "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    if found == sorted(classes):
        return
    if {"train", "val"} <= set(found) and not {"train", "val"} & set(classes):
        raise DataError(f"{data_dir} holds train/ and val/ rather than class folders: pass {data_dir / 'val'}")
    only_folder = sorted(set(found) - set(classes))
    only_ckpt = sorted(set(classes) - set(found))
    parts = [f"only in the folder: {_names(only_folder)}"] if only_folder else []
    parts += [f"only in the checkpoint: {_names(only_ckpt)}"] if only_ckpt else []
    raise DataError(
        f"class folders in {data_dir} differ from the checkpoint's classes ({'; '.join(parts)}): "
        "evaluate on a folder with exactly the classes the model was trained on"
    )


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_eval_split(state: dict[str, Any], data_dir: str | Path, cache_max_mb: int = 2048) -> DecodedSplit:
    """The images of `data_dir/<class>/` decoded the way the checkpoint was trained (size, filter)."""
    data_dir = Path(data_dir)
    check_class_folders(data_dir, state["classes"])
    # scan_split takes the classes in the checkpoint's order, so label i means the model's output i.
    index = scan_split(data_dir, list(state["classes"]))
    return decode_split(index, state["img_size"], state["interpolation"], cache_max_mb,
                        fix="remove or replace the file")


@dataclass
class Predictions:
    paths: list[Path]
    labels: np.ndarray  # int64 [N]
    logits: np.ndarray  # float32 [N, C]

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits), dim=1).numpy()

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def losses(self) -> np.ndarray:
        """Cross-entropy of each image: high for confident mistakes and for unsure right answers."""
        return torch.nn.functional.cross_entropy(
            torch.from_numpy(self.logits), torch.from_numpy(self.labels), reduction="none").numpy()


def predict_split(model: nn.Module, split: DecodedSplit, mean: Sequence[float], std: Sequence[float],
                  batch_size: int = 64, device: torch.device | str = "cpu") -> Predictions:
    model = model.eval().to(device)
    logits = []
    with torch.no_grad():
        for images, _ in split.batches(torch.arange(len(split)), batch_size):
            x = normalize(images.to(device), tuple(mean), tuple(std))
            logits.append(model(x).float().cpu())
    return Predictions(list(split.paths), split.labels.numpy().copy(), torch.cat(logits).numpy())


def worst_images(predictions: Predictions, classes: Sequence[str], k: int = WORST_IMAGES) -> list[dict[str, Any]]:
    """The k highest-loss images, worst first, with what the model said."""
    losses, probs, pred = predictions.losses, predictions.probabilities, predictions.predicted
    order = np.argsort(-losses, kind="stable")[:k]
    return [
        {
            "path": str(predictions.paths[i]),
            "true": classes[predictions.labels[i]],
            "predicted": classes[pred[i]],
            "probability": float(probs[i, pred[i]]),
            "true_probability": float(probs[i, predictions.labels[i]]),
            "loss": float(losses[i]),
        }
        for i in order
    ]


@dataclass
class EvalReport:
    out_dir: Path
    metrics: ClassificationMetrics
    loss: float
    files: dict[str, Path] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)  # see calibration_metrics
    split: str = "val"  # which split it was: val, test, train or "folder NAME"

    def summary(self) -> dict[str, Any]:
        """Small and JSON-able: what a Prefect task returns."""
        return {"out_dir": str(self.out_dir), "split": self.split, "loss": self.loss, "images": self.metrics.total,
                **self.metrics.summary(), **self.calibration, "files": {k: str(v) for k, v in self.files.items()}}


def calibration_metrics(predictions: Predictions, temperature: float | None) -> dict[str, float]:
    """ECE (15 bins) of the raw softmax, and with the checkpoint's temperature when it has one: then
    also that temperature and the loss (NLL) with it. `loss` stays the raw network's."""
    logits, labels = torch.from_numpy(predictions.logits), torch.from_numpy(predictions.labels)
    out = {"ece": expected_calibration_error(logits, labels)}
    if temperature is not None:
        out.update({"temperature": float(temperature),
                    "ece_calibrated": expected_calibration_error(logits, labels, float(temperature)),
                    "loss_calibrated": nll(logits, labels, float(temperature))})
    return out


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_report(out_dir: str | Path, state: dict[str, Any], predictions: Predictions,
                 source: dict[str, Any], history: list[dict[str, Any]] | None = None,
                 split: str = "val") -> EvalReport:
    """The report files; `history` (default: the checkpoint's own) draws the learning curves."""
    from harv_train.reporting import plots  # matplotlib is only imported by what draws

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = state.get("history", []) if history is None else history
    classes = list(state["classes"])
    metrics = classification_metrics(predictions.labels, predictions.predicted, classes)
    worst = worst_images(predictions, classes)
    loss = float(predictions.losses.mean())
    temperature = state.get("temperature")
    calibration = calibration_metrics(predictions, temperature)
    files: dict[str, Path] = {}

    report = {**source, "loss": loss, **calibration, **metrics.to_dict(), "worst_images": worst}
    files["report"] = out_dir / "report.json"
    files["report"].write_text(json.dumps(report, indent=2), encoding="utf-8")
    rows = metrics.table_rows()
    files["per_class"] = _write_csv(out_dir / "per_class.csv", list(rows[0]), [list(r.values()) for r in rows])
    files["confusion_csv"] = _write_csv(out_dir / "confusion_matrix.csv", ["true \\ predicted", *classes],
                                        [[c, *row] for c, row in zip(classes, metrics.confusion.tolist())])
    files["worst_csv"] = _write_csv(out_dir / "worst_images.csv", list(worst[0]), [list(w.values()) for w in worst])

    files["learning_curves"] = plots.learning_curves(history, state.get("best_epoch"), out_dir / "learning_curves.png")
    files["confusion_plot"] = plots.confusion_matrix_plot(metrics.confusion, classes, out_dir / "confusion_matrix.png")
    files["worst_images"] = plots.contact_sheet(worst, out_dir / "worst_images.png")
    logits, labels = torch.from_numpy(predictions.logits).double(), torch.from_numpy(predictions.labels)
    curves = {"softmax": reliability_bins(torch.softmax(logits, 1), labels)}
    if temperature is not None:
        curves[f"temperature {float(temperature):.3g}"] = reliability_bins(torch.softmax(logits / temperature, 1), labels)
    files["reliability"] = plots.reliability_diagram(curves, out_dir / "reliability.png")
    return EvalReport(out_dir, metrics, loss, files, calibration, split)


def run_history(checkpoint: str | Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole run's per-epoch history: best_model.pth was saved at its best epoch, so the epochs after
    it are only in last.pth / final_model.pth of the same run (same run_uid) beside it."""
    history = list(state.get("history", []))
    for name in (ckpt.FINAL, ckpt.LAST):
        sibling = Path(checkpoint).with_name(name)
        if sibling.is_file() and sibling != Path(checkpoint):
            try:
                other = ckpt.load_checkpoint(sibling)
            except CheckpointError:
                continue
            if other.get("run_uid") == state.get("run_uid") and len(other.get("history", [])) > len(history):
                history = list(other["history"])
    return history


def default_out_dir(checkpoint: str | Path, name: str) -> Path:
    """ARTIFACTS_DIR/<name> for a checkpoint in ARTIFACTS_DIR/checkpoints/, else beside the checkpoint."""
    parent = Path(checkpoint).resolve().parent
    return parent.parent / name if parent.name == "checkpoints" else parent / name


def split_name(data_dir: str | Path) -> str:
    """Which split a folder is, for the report: train, val or test by its name, else the folder's name."""
    name = Path(data_dir).name
    return name if name in ("train", "val", "test") else f"folder {name}"


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path,
                        device: str | torch.device = "cpu", cache_max_mb: int = 2048,
                        split: DecodedSplit | None = None, split_label: str | None = None) -> EvalReport:
    """Evaluate `checkpoint` on `data_dir/<class>/*` (or an already decoded `split`) into `out_dir`;
    the report names the split (`split_label`, default: from the folder's name)."""
    state, model = load_trained_model(checkpoint)
    if split is None:
        split = load_eval_split(state, data_dir, cache_max_mb)
    elif split.classes != list(state["classes"]):
        raise DataError(f"the {split_label or 'split'}'s classes {split.classes} are not the checkpoint's {state['classes']}")
    predictions = predict_split(model, split, state["mean"], state["std"], device=device)
    label = split_label or split_name(data_dir)
    source = {"checkpoint": str(checkpoint), "split": label, "data_dir": str(data_dir), "model_name": state["model_name"],
              "epoch": state["epoch"], "best_epoch": state.get("best_epoch"), "img_size": state["img_size"]}
    report = write_report(out_dir, state, predictions, source, run_history(checkpoint, state), label)
    m = report.metrics
    c = report.calibration
    calibrated = (f", with temperature {c['temperature']:.3g}: ECE {c['ece_calibrated']:.4f}, loss {c['loss_calibrated']:.4f}"
                  if "temperature" in c else "")
    logger.info(f"Evaluation of {checkpoint} on the {label} split, {m.total} images in {data_dir}: accuracy {m.accuracy:.4f}, "
        f"macro F1 {m.macro['f1']:.4f}, loss {report.loss:.4f}, ECE {c['ece']:.4f}{calibrated} -> {report.out_dir}")
    return report


__all__ = [
    "EvalReport",
    "Predictions",
    "default_out_dir",
    "evaluate_checkpoint",
    "load_eval_split",
    "load_trained_model",
    "predict_split",
    "worst_images",
    "write_report",
]
