"""What a training run does after its last epoch: calibrate, evaluate and export the best model.

The temperature goes into best_model.pth (before the flow logs the model), the report to
`ARTIFACTS_DIR/eval/` and the export to `ARTIFACTS_DIR/export/`; the flow logs them to its MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harv_train.config import TrainConfig
from harv_train.core import checkpoints as ckpt
from harv_train.core.calibration import Calibration, calibrate
from harv_train.core.data import DecodedSplit
from harv_train.reporting.evaluation import EvalReport, evaluate_checkpoint, load_trained_model, predict_split
from harv_train.reporting.export import ExportResult, export_model


@dataclass(frozen=True)
class PostTraining:
    evaluation: EvalReport
    export: ExportResult | None  # None when `export: false`
    test: EvalReport | None = None  # None without a test split


def calibrate_checkpoint(checkpoint: Path, val: DecodedSplit, device: torch.device | str = "cpu") -> Calibration:
    """Fit the temperature of `checkpoint` (a run's best_model.pth) on the val images and write it, and
    what it did, into the file. Deterministic: a resumed run that calibrates again writes the same number."""
    best = Path(checkpoint)
    state, model = load_trained_model(best)
    predictions = predict_split(model, val, state["mean"], state["std"], device=device)
    result = calibrate(torch.from_numpy(predictions.logits), torch.from_numpy(predictions.labels))
    ckpt.save_checkpoint({**state, "temperature": result.temperature, "calibration": result.to_dict()}, best)
    return result


def evaluate_and_export(cfg: TrainConfig, val: DecodedSplit, device: torch.device,
                        test: DecodedSplit | None = None) -> PostTraining:
    """Evaluate best_model.pth on the (already decoded) val split, and on the test split when there is
    one (after the model was chosen: the test numbers choose nothing); export it when `cfg.export`."""
    best = cfg.checkpoints_dir / ckpt.BEST
    report = evaluate_checkpoint(best, _split_dir(cfg, "val"), cfg.eval_dir, device=device, split=val,
                                 split_label="val")
    tested = None
    if test is not None:
        tested = evaluate_checkpoint(best, _split_dir(cfg, "test"), cfg.test_eval_dir, device=device, split=test,
                                     split_label="test")
    exported = None
    if cfg.export:
        state, model = load_trained_model(best)
        exported = export_model(model, state, val, cfg.export_dir)
    return PostTraining(report, exported, tested)


def _split_dir(cfg: TrainConfig, split: str) -> Path:
    """Where the split's images are: its folder, or data_dir itself for splits made by val_fraction."""
    return Path(cfg.data_dir) if cfg.val_fraction is not None else Path(cfg.data_dir) / split


def table_rows(report: EvalReport) -> list[dict[str, Any]]:
    """The per-class table with rounded numbers: what the Prefect table artifact shows."""
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for row in report.metrics.table_rows()]
