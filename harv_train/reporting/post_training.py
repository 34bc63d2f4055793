"""What a training run does after its last epoch: evaluate the best model and export it.

The report goes to `ARTIFACTS_DIR/eval/` and the export to `ARTIFACTS_DIR/export/`; the flow logs
both to its MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harv_train.config import TrainConfig
from harv_train.core import checkpoints as ckpt
from harv_train.core.data import DecodedSplit
from harv_train.reporting.evaluation import EvalReport, evaluate_checkpoint, load_trained_model
from harv_train.reporting.export import ExportResult, export_model


@dataclass(frozen=True)
class PostTraining:
    evaluation: EvalReport
    export: ExportResult | None  # None when `export: false`
    test: EvalReport | None = None  # None without a test split


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
