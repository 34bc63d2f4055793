"""Export a checkpoint to TorchScript and ONNX, check both against PyTorch, and time them on CPU.

`export_checkpoint(checkpoint, split, out_dir)` writes

    model.ts            TorchScript (traced); model.json is also embedded as an extra file
    model.onnx          ONNX, dynamic batch size; classes and normalization in its metadata
    model.json          what a user of the files needs: classes in output order, mean, std, img_size,
                        resize filter, temperature, input and output layout
    export_report.json  parity (max abs logit difference to PyTorch on real validation images) and
                        CPU latency per image at batch 1 (median of repeated runs) for each runtime

A calibrated checkpoint's temperature is inside both graphs (their output is logits / T, see
harv_train.core.calibration): softmax of the output is the calibrated probability in any runtime.

The files are written under temporary names and renamed into place only after the parity check, so
`out_dir` never holds an export that computes something else than the checkpoint.
"""

from __future__ import annotations

import logging
import contextlib
import json
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from harv_train.core.augment import normalize
from harv_train.core.calibration import with_temperature
from harv_train.core.data import DecodedSplit
from harv_train.errors import ExportError

logger = logging.getLogger(__name__)

TOLERANCE = 1e-3  # max abs logit difference; float32 kernels differ by ~1e-5 on these models
PARITY_IMAGES = 32
LATENCY_RUNS = 50
LATENCY_BUDGET_S = 2.0  # per runtime
ONNX_OPSET = 17


def model_card(state: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to feed the exported model and read its output, beside the weights."""
    size = int(state["img_size"])
    temperature = state.get("temperature")
    meaning = "unnormalized scores in the order of classes; softmax gives probabilities"
    if temperature is not None:
        meaning = (f"calibrated scores in the order of classes: the network's logits already divided by "
                   f"temperature {float(temperature):.4g}; softmax gives calibrated probabilities")
    return {
        "format": "harv-train-export/1",
        "model_name": state["model_name"],
        "classes": list(state["classes"]),
        "img_size": size,
        "interpolation": state["interpolation"],
        "mean": [float(v) for v in state["mean"]],
        "std": [float(v) for v in state["std"]],
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", 3, size, size],
                  "preprocessing": f"RGB, resize to {size}x{size} ({state['interpolation']}), "
                                   "scale to 0..1, subtract mean, divide by std"},
        "temperature": None if temperature is None else float(temperature),
        "output": {"name": "logits", "shape": ["batch", len(state["classes"])], "meaning": meaning},
        "epoch": state.get("epoch"),
        "best_val_acc": state.get("best_val_acc"),
    }


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    # torch.jit and the TorchScript-based ONNX exporter are deprecated in favour of torch.export,
    # but TorchScript is still what C++ and mobile runtimes load: the warnings would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    with quiet_deprecations():
        return torch.jit.load(str(path), map_location="cpu").eval()


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, card: dict[str, Any]) -> Path:
    with quiet_deprecations():
        # check_trace would run the model again to compare: the parity check on real images does that.
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"model.json": json.dumps(card)})
    return path


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, card: dict[str, Any]) -> Path:
    import onnx

    with quiet_deprecations():
        # The TorchScript-based exporter: the torch.export-based default needs onnxscript, which is
        # not installed, and these convolutional graphs export exactly with either.
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(card.get(k)) for k in ("classes", "mean", "std", "img_size",
                                                                            "interpolation", "model_name",
                                                                            "temperature")})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle onnxruntime threads spin by default and would steal the cores from whatever runs next
    # (the PyTorch latency measurement, or the rest of the training flow).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity_batch(split: DecodedSplit, card: dict[str, Any], n: int = PARITY_IMAGES) -> torch.Tensor:
    """Up to n real images spread over the split (so every class shows up), normalized."""
    index = torch.linspace(0, len(split) - 1, steps=min(n, len(split))).round().long().unique()
    images, _ = next(split.batches(index, len(index)))
    return normalize(images, tuple(card["mean"]), tuple(card["std"]))


def median_latencies_ms(runners: dict[str, Callable[[], Any]], runs: int = LATENCY_RUNS, warmup: int = 3,
                        budget_s: float = LATENCY_BUDGET_S) -> tuple[dict[str, float], int]:
    """Median wall time in ms of each runner, and the number of timed rounds.

    The runners take turns within each round, so a burst of load from another process slows them
    all alike instead of one. `runs` rounds, or fewer (at least 5) once `budget_s` per runner is
    spent, so a big model on a slow CPU does not stall a flow.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    rounds = 0
    deadline = time.perf_counter() + budget_s * len(runners)
    while rounds < runs and (rounds < min(5, runs) or time.perf_counter() < deadline):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    parity: dict[str, Any]
    latency_ms: dict[str, float]
    environment: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow."""
        out = {f"export_{k}_max_abs_diff": v for k, v in self.parity["max_abs_diff"].items()}
        out.update({f"latency_ms_{k}": v for k, v in self.latency_ms.items()})
        return out

    def summary(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "files": {k: str(v) for k, v in self.files.items()},
                "parity": self.parity, "latency_ms": self.latency_ms, "environment": self.environment}


def export_model(model: nn.Module, state: dict[str, Any], split: DecodedSplit, out_dir: str | Path,
                 tolerance: float = TOLERANCE, latency_runs: int = LATENCY_RUNS) -> ExportResult:
    """Export `model` (eval mode, CPU) with `state`'s temperature in the graph, check both files on
    `split`'s images against it, then move them into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = with_temperature(model.eval().cpu(), state.get("temperature"))
    card = model_card(state)
    size = card["img_size"]
    example = torch.zeros(1, 3, size, size)
    tmp = {name: out_dir / f".{name}.tmp" for name in ("model.ts", "model.onnx")}
    try:
        export_torchscript(model, example, tmp["model.ts"], card)
        export_onnx(model, example, tmp["model.onnx"], card)

        threads = torch.get_num_threads()
        scripted = load_torchscript(tmp["model.ts"])
        session = onnx_session(tmp["model.onnx"], threads)
        x = parity_batch(split, card)
        with torch.no_grad():
            reference = model(x).numpy()
            outputs = {"torchscript": scripted(x).numpy(), "onnxruntime": session.run(None, {"input": x.numpy()})[0]}
        diffs = {k: float(np.abs(v - reference).max()) for k, v in outputs.items()}
        parity = {"images": int(x.shape[0]), "tolerance": tolerance, "max_abs_diff": diffs,
                  "max_abs_logit": float(np.abs(reference).max()),
                  "same_predictions": {k: bool((v.argmax(1) == reference.argmax(1)).all()) for k, v in outputs.items()}}
        bad = {k: d for k, d in diffs.items() if not d <= tolerance}  # `not <=` also catches NaN
        if bad:
            raise ExportError(
                "export does not match the PyTorch model: max abs logit difference "
                + ", ".join(f"{k} {d:.2e}" for k, d in bad.items())
                + f" > tolerance {tolerance:.0e} on {x.shape[0]} val images; the files were not written "
                "(set export: false to train without exporting)"
            )

        one = x[:1]
        one_np = one.numpy()
        with torch.no_grad():
            latency, rounds = median_latencies_ms({
                "pytorch": lambda: model(one),
                "torchscript": lambda: scripted(one),
                "onnxruntime": lambda: session.run(None, {"input": one_np}),
            }, latency_runs)
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise

    files = {"torchscript": out_dir / "model.ts", "onnx": out_dir / "model.onnx",
             "model_card": out_dir / "model.json", "export_report": out_dir / "export_report.json"}
    tmp["model.ts"].replace(files["torchscript"])
    tmp["model.onnx"].replace(files["onnx"])
    files["model_card"].write_text(json.dumps(card, indent=2), encoding="utf-8")
    import onnxruntime

    environment = {"cpu": cpu_name(), "threads": threads, "batch_size": 1, "runs": rounds,
                   "img_size": size, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    result = ExportResult(out_dir, files, parity, latency, environment)
    files["export_report"].write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")
    logger.info(f"Exported {card['model_name']} to {files['torchscript']} and {files['onnx']}: max abs logit difference "
        + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items())
        + f" on {parity['images']} val images; CPU latency per image (batch 1, median of {rounds} runs, "
        f"{threads} threads): " + ", ".join(f"{k} {v:.1f} ms" for k, v in latency.items()))
    return result


def export_checkpoint(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path,
                      split: DecodedSplit | None = None, tolerance: float = TOLERANCE,
                      latency_runs: int = LATENCY_RUNS) -> ExportResult:
    """Load `checkpoint`, take the parity images from `data_dir/<class>/*` (or `split`), export."""
    from harv_train.reporting.evaluation import load_eval_split, load_trained_model

    state, model = load_trained_model(checkpoint)
    if split is None:
        split = load_eval_split(state, data_dir)
    return export_model(model, state, split, out_dir, tolerance, latency_runs)


def read_model_card(path: str | Path) -> dict[str, Any]:
    """model.json beside an exported model."""
    path = Path(path)
    card_path = path if path.suffix == ".json" else path.with_name("model.json")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ExportError(f"{card_path} is missing or unreadable: keep model.json beside {path.name} "
                          "(export again with flows/evaluate_flow.py --export)") from None
    if not isinstance(card, dict) or card.get("format") != "harv-train-export/1":
        raise ExportError(f"{card_path} is not a harv-train model card: export again with flows/evaluate_flow.py --export")
    return card


__all__: Sequence[str] = ["ExportResult", "export_checkpoint", "export_model", "model_card", "read_model_card"]
