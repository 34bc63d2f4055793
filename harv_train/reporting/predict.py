"""Classify image files with a checkpoint (.pth) or an exported model (.ts, .onnx + model.json).

Each image is decoded exactly as in training and evaluation (harv_train.core.data.decode_image: RGB, the
model's resize filter, its img_size) and normalized with the model's mean and std, so a prediction
here is what the evaluation report measured. A calibrated model's temperature divides the logits in
every runtime (the checkpoint's `temperature`; inside the exported graphs), so "probability" is the
calibrated one. `tta="flip"` averages the probabilities of each image and its mirror image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from harv_train.core.augment import normalize
from harv_train.core.calibration import with_temperature
from harv_train.core.data import IMG_EXTENSIONS, decode_image
from harv_train.errors import DataError, UserError

BATCH_SIZE = 32
TTA_MODES = ("none", "flip")


@dataclass
class Predictor:
    classes: list[str]
    img_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    logits: Callable[[torch.Tensor], np.ndarray]  # normalized float32 [B, 3, S, S] -> [B, C]
    source: str


def load_predictor(path: str | Path) -> Predictor:
    """A checkpoint (.pth) runs in PyTorch; model.ts in TorchScript; model.onnx in onnxruntime."""
    path = Path(path)
    if path.suffix in (".ts", ".onnx"):
        return _exported_predictor(path)
    from harv_train.reporting.evaluation import load_trained_model

    state, model = load_trained_model(path)
    model = with_temperature(model, state.get("temperature"))

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x).float().numpy()

    return Predictor(list(state["classes"]), int(state["img_size"]), state["interpolation"],
                     tuple(state["mean"]), tuple(state["std"]), run, str(path))


def _exported_predictor(path: Path) -> Predictor:
    from harv_train.reporting.export import load_torchscript, onnx_session, read_model_card
    from harv_train.core.runtime import available_cores

    if not path.is_file():
        raise UserError(f"model {path} does not exist: export one with flows/evaluate_flow.py --export")
    card = read_model_card(path)
    if path.suffix == ".ts":
        module = load_torchscript(path)

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return module(x).float().numpy()
    else:
        session = onnx_session(path, available_cores())

        def run(x: torch.Tensor) -> np.ndarray:
            return session.run(None, {"input": x.numpy()})[0]

    return Predictor(list(card["classes"]), int(card["img_size"]), card["interpolation"],
                     tuple(card["mean"]), tuple(card["std"]), run, str(path))


def list_images(target: str | Path) -> list[Path]:
    """One image file, or every image under a folder (recursively, sorted)."""
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise DataError(f"{target} does not exist: give an image file or a folder of images")
    images = sorted(p for p in target.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
    if not images:
        raise DataError(f"{target} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...): "
                        "give an image file or a folder of images")
    return images


def probabilities(predictor: Predictor, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Softmax of the predictor's (calibrated) logits for normalized images `x`; with tta="flip", the
    mean of those of `x` and of its left-right mirror."""
    def softmax(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.from_numpy(np.asarray(predictor.logits(batch), dtype=np.float32)), dim=1)

    if tta == "flip":
        return (softmax(x) + softmax(x.flip(-1).contiguous())) / 2
    if tta != "none":
        raise UserError(f"tta {tta!r} is not known: choose one of {', '.join(TTA_MODES)}")
    return softmax(x)


def predict(predictor: Predictor, paths: Sequence[Path], batch_size: int = BATCH_SIZE,
            tta: str = "none") -> list[dict[str, Any]]:
    """One dict per path, in order: class and probability, or the reason the image could not be read."""
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        decoded: list[tuple[int, torch.Tensor]] = []
        rows: list[dict[str, Any]] = [{"image": str(p)} for p in chunk]
        for i, path in enumerate(chunk):
            try:
                decoded.append((i, decode_image(path, predictor.img_size, predictor.interpolation)))
            except DataError as exc:
                rows[i]["error"] = str(exc)
        if decoded:
            x = normalize(torch.stack([t for _, t in decoded]), predictor.mean, predictor.std)
            probs = probabilities(predictor, x, tta)
            for (i, _), p in zip(decoded, probs):
                best = int(p.argmax())
                rows[i].update({"class": predictor.classes[best], "probability": float(p[best])})
        results.extend(rows)
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    width = max([len("image")] + [len(r["image"]) for r in results])
    cls_width = max([len("class")] + [len(r.get("class", "")) for r in results])
    lines = [f"{'image':<{width}}  {'class':<{cls_width}}  probability"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['image']:<{width}}  error: {r['error']}")
        else:
            lines.append(f"{r['image']:<{width}}  {r['class']:<{cls_width}}  {r['probability']:.4f}")
    return "\n".join(lines)


def format_json(results: Sequence[dict[str, Any]], source: str) -> str:
    return json.dumps({"model": source, "predictions": list(results)}, indent=2)
