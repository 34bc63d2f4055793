"""The registered model as MLflow serves it: image files in, class and probabilities out, no pickle.

`log_image_classifier` logs a checkpoint as an MLflow pyfunc model made of plain files:

    model.safetensors   the weights (safetensors: tensors only, nothing executes on load)
    model.json          classes in output order, img_size, resize filter, mean, std, temperature
    model.onnx          the same network in ONNX, checked against PyTorch: the fast CPU path
    code/harv_train/    this package, which builds the network and decodes images (code_paths)
    pyfunc_entry.py     MLflow's "model from code": it constructs `ImageClassifier()`

Nothing in it is a pickle: MLflow runs pyfunc_entry.py with the model's code on sys.path, and
`ImageClassifier.load_context` reads the files above. It loads with
`MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`.

Input: a DataFrame (or the JSON `dataframe_split` / `dataframe_records` of `mlflow models serve`) with
a column `image` of base64-encoded image files (JPEG, PNG, ... anything PIL reads; a `data:` URL
prefix is accepted). Each image is decoded exactly as in training (harv_train.core.data.decode_image)
and normalized with the model's mean and std. A calibrated model's temperature (model.json) divides
the logits in both runtimes: model.onnx holds the division, the PyTorch path adds it. Output, one record per input row, in order:
`{"class", "probability", "probabilities": {class: p, ...}}`, or `{"error": "..."}` for a row that
is not a readable image (the other rows are unaffected). An empty request raises an MlflowException
with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400.

Runtime: onnxruntime when the model holds model.onnx, else PyTorch; `HARV_TRAIN_SERVING_RUNTIME=torch`
(or `onnx`) in the serving process's environment, or `model_config={"runtime": ...}` in
`mlflow.pyfunc.load_model`, chooses.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from harv_train.core.augment import normalize
from harv_train.core.data import decode_image
from harv_train.errors import DataError
from harv_train.reporting.predict import BATCH_SIZE, Predictor

logger = logging.getLogger(__name__)

INPUT_COLUMN = "image"
RUNTIME_ENV = "HARV_TRAIN_SERVING_RUNTIME"
RUNTIMES = ("onnx", "torch")
WEIGHTS, CARD, ONNX = "model.safetensors", "model.json", "model.onnx"
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
PACKAGE = Path(__file__).resolve().parents[1]  # harv_train/
PARITY_TOLERANCE = 1e-3  # max abs logit difference, as the export's check


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The served model; constructed by pyfunc_entry.py, configured by the files in its artifacts."""

    def load_context(self, context) -> None:
        card_path = Path(context.artifacts["model_card"])
        self.card = json.loads(card_path.read_text(encoding="utf-8"))
        config = getattr(context, "model_config", None) or {}
        self.runtime = choose_runtime(config.get("runtime") or os.environ.get(RUNTIME_ENV),
                                      "onnx" in context.artifacts)
        self.predictor = load_predictor(self.card, Path(context.artifacts["weights"]),
                                        Path(context.artifacts["onnx"]) if self.runtime == "onnx" else None)

    # A DataFrame hint: MLflow checks the input against the signature, and infers nothing from the hint.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[dict[str, Any]]:
        return classify(self.predictor, images_of(model_input))


def choose_runtime(asked: str | None, has_onnx: bool) -> str:
    from mlflow.exceptions import MlflowException

    if asked and asked not in RUNTIMES:
        raise MlflowException(f"{RUNTIME_ENV}={asked!r}: choose one of {', '.join(RUNTIMES)}")
    if asked == "onnx" and not has_onnx:
        raise MlflowException(f"{RUNTIME_ENV}=onnx, but this model holds no {ONNX}: unset it to serve with PyTorch")
    return asked or ("onnx" if has_onnx else "torch")


def load_predictor(card: dict[str, Any], weights: Path, onnx: Path | None = None) -> Predictor:
    """PyTorch on the safetensors weights, or onnxruntime on model.onnx (same card)."""
    if onnx is not None:
        from harv_train.core.runtime import available_cores
        from harv_train.reporting.export import onnx_session

        session = onnx_session(onnx, available_cores())

        def run(x: torch.Tensor) -> np.ndarray:
            return session.run(None, {"input": x.numpy()})[0]
        source = str(onnx)
    else:
        from safetensors.torch import load_file

        from harv_train.core.calibration import with_temperature
        from harv_train.core.models import build_architecture

        model = build_architecture(card["model_name"], len(card["classes"]))
        model.load_state_dict(load_file(str(weights)))
        model = with_temperature(model.eval(), card.get("temperature"))  # model.onnx holds it already

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return model(x).float().numpy()
        source = str(weights)
    return Predictor(list(card["classes"]), int(card["img_size"]), card["interpolation"],
                     tuple(card["mean"]), tuple(card["std"]), run, source)


def images_of(model_input: Any) -> list[Any]:
    """The `image` values of a request, in order: a DataFrame, a dict of columns, or a list."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise MlflowException(
                f"the request has no column {INPUT_COLUMN!r} (columns: {', '.join(map(str, model_input.columns))}): "
                f"send base64-encoded image files in a column named {INPUT_COLUMN!r}", INVALID_PARAMETER_VALUE)
        values = model_input[INPUT_COLUMN].tolist()
    elif isinstance(model_input, dict):  # {"inputs": {"image": [...]}}: MLflow hands over an array
        column = model_input.get(INPUT_COLUMN)
        values = [] if column is None else list(column)
    else:
        values = list(model_input)
    if not values:
        raise MlflowException(
            f"the request holds no images: send one or more base64-encoded image files in the column "
            f"{INPUT_COLUMN!r}, e.g. {{\"dataframe_split\": {{\"columns\": [\"{INPUT_COLUMN}\"], "
            f"\"data\": [[\"<base64>\"]]}}}}", INVALID_PARAMETER_VALUE)
    return values


class _RequestImage(io.BytesIO):
    """An image file of a request, named by its row in decode_image's messages."""

    def __init__(self, data: bytes, row: int):
        super().__init__(data)
        self.row = row

    def __str__(self) -> str:
        return f"in row {self.row}"

    def __repr__(self) -> str:  # what PIL names in "cannot identify image file ..."
        return f"of {len(self.getbuffer())} bytes"


def _file_bytes(value: Any, row: int) -> bytes:
    """The image file in one cell: base64 text (optionally a data: URL), or raw bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise DataError(f"row {row} holds no image ({type(value).__name__}): send a base64-encoded image file")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"row {row} is not base64: send each image file base64-encoded") from None
    if not data:
        raise DataError(f"row {row} is empty: send a base64-encoded image file")
    return data


def classify(predictor: Predictor, values: Sequence[Any], batch_size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """One record per value, in order: class, probability and every class's probability (softmax of
    the predictor's logits, which a calibrated model has divided by its temperature), or the reason
    the value is not a readable image."""
    rows: list[dict[str, Any]] = [{} for _ in values]
    decoded: list[tuple[int, torch.Tensor]] = []
    for i, value in enumerate(values):
        try:
            image = _RequestImage(_file_bytes(value, i), i)
            decoded.append((i, decode_image(image, predictor.img_size, predictor.interpolation)))
        except DataError as exc:
            rows[i] = {"error": str(exc)}
    for start in range(0, len(decoded), batch_size):
        chunk = decoded[start : start + batch_size]
        x = normalize(torch.stack([t for _, t in chunk]), predictor.mean, predictor.std)
        logits = torch.from_numpy(np.asarray(predictor.logits(x), dtype=np.float32))
        probs = torch.softmax(logits, dim=1).tolist()
        for (i, _), p in zip(chunk, probs):
            best = max(range(len(p)), key=p.__getitem__)
            rows[i] = {"class": predictor.classes[best], "probability": p[best],
                       "probabilities": dict(zip(predictor.classes, p))}
    return rows


# ---- logging -------------------------------------------------------------------------------------


def model_card(state: dict[str, Any]) -> dict[str, Any]:
    """The export's model card (harv_train.reporting.export, temperature included), plus the weights file."""
    from harv_train.reporting.export import model_card as export_card

    card = export_card(state)
    card["weights"] = WEIGHTS
    return card


def write_model_files(state: dict[str, Any], out_dir: Path, onnx: Path | None | bool = True) -> dict[str, str]:
    """model.safetensors, model.json and (unless onnx=False) model.onnx in `out_dir`; returns MLflow's
    `artifacts` mapping. `onnx` may be an exported file to reuse; True exports one here, checked on a
    random batch against PyTorch (a failed export or check only leaves the ONNX path out)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    card = model_card(state)
    weights = {k: v.detach().contiguous() for k, v in state["model"].items()}
    save_file(weights, str(out_dir / WEIGHTS), metadata={"format": "harv-train-weights/1",
                                                         "model_name": card["model_name"]})
    (out_dir / CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
    artifacts = {"weights": str(out_dir / WEIGHTS), "model_card": str(out_dir / CARD)}
    if isinstance(onnx, Path):
        shutil.copyfile(onnx, out_dir / ONNX)
        artifacts["onnx"] = str(out_dir / ONNX)
    elif onnx:
        try:
            _export_checked_onnx(state, card, out_dir / ONNX)
            artifacts["onnx"] = str(out_dir / ONNX)
        except Exception as exc:  # the PyTorch path still serves
            logger.warning(f"WARNING: no ONNX file in the logged model ({type(exc).__name__}: {exc}); "
                           "it serves with PyTorch")
            (out_dir / ONNX).unlink(missing_ok=True)
    return artifacts


def _export_checked_onnx(state: dict[str, Any], card: dict[str, Any], path: Path) -> None:
    from harv_train.core.calibration import with_temperature
    from harv_train.core.checkpoints import load_model_from_checkpoint
    from harv_train.reporting.export import export_onnx, onnx_session

    model = with_temperature(load_model_from_checkpoint(state).cpu(), state.get("temperature"))
    size = card["img_size"]
    export_onnx(model, torch.zeros(1, 3, size, size), path, card)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x).numpy()
    got = onnx_session(path, 1).run(None, {"input": x.numpy()})[0]
    diff = float(np.abs(got - reference).max())
    if not diff <= PARITY_TOLERANCE:
        raise ValueError(f"ONNX differs from PyTorch by {diff:.1e} > {PARITY_TOLERANCE:.0e}")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, INPUT_COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, "class", required=False),
                        ColSpec(DataType.double, "probability", required=False),
                        ColSpec(Map(DataType.double), "probabilities", required=False),
                        ColSpec(DataType.string, "error", required=False)]),
    )


def example_image(img_size: int) -> str:
    """A mid-grey PNG of the model's size, base64: the input example MLflow stores with the model."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (img_size, img_size), (128, 128, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def requirements(with_onnx: bool) -> list[str]:
    """Pinned to what logged the model; explicit, which skips MLflow's slow dependency inference."""
    from importlib.metadata import version

    names = ["torch", "torchvision", "mlflow", "numpy", "pillow", "safetensors", "pandas"]
    if with_onnx:
        names.append("onnxruntime")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Without MLflow's "Validating input example" line and the progress bars of the downloads its
    check makes (noise in a training run's output; the check itself still runs)."""
    mlflow_logger = logging.getLogger("mlflow.pyfunc")
    level, bars = mlflow_logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    mlflow_logger.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        mlflow_logger.setLevel(level)
        if bars is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bars


def log_image_classifier(state: dict[str, Any], name: str = "model", tags: dict[str, str] | None = None,
                         onnx: Path | None | bool = True):
    """Log checkpoint `state` as the pyfunc model above, in the active MLflow run; returns ModelInfo.
    MLflow checks the logged model on its input example (it loads it and predicts) before it returns."""
    with tempfile.TemporaryDirectory(prefix="harv-train-pyfunc-") as tmp, _quiet_logging():
        files = write_model_files(state, Path(tmp, "files"), onnx)
        code = Path(tmp, "code", PACKAGE.name)
        shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY),
            artifacts=files,
            code_paths=[str(code)],
            signature=signature(),
            input_example=pd.DataFrame({INPUT_COLUMN: [example_image(int(state["img_size"]))]}),
            pip_requirements=requirements("onnx" in files),
            tags=tags,
        )


__all__ = ["ImageClassifier", "classify", "images_of", "load_predictor", "log_image_classifier",
           "model_card", "write_model_files"]
