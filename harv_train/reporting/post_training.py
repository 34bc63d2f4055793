"""What a training run does after its last epoch: evaluate the best model, export it, log both.

The report goes to `ARTIFACTS_DIR/eval/` and the export to `ARTIFACTS_DIR/export/`, then to the
run's MLflow run (`evaluation/` and `export/` artifacts, `eval_*`, `export_*` and `latency_ms_*`
metrics) through `MlflowTracker`, so an MLflow outage is recorded, never fatal: the files stay on
disk and `--resume` logs them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harv_train.core import checkpoints as ckpt
from harv_train.core import trainer
from harv_train.config import TrainConfig
from harv_train.reporting.evaluation import EvalReport, evaluate_checkpoint
from harv_train.reporting.export import ExportResult, export_model
from harv_train.core.runtime import configure_threads, resolve_device
from harv_train.tracking.mlflow_tracker import MlflowTracker

Log = Callable[[str], None]


def log_evaluation(tracker: MlflowTracker, report: EvalReport) -> None:
    metrics = {f"eval_{k}": v for k, v in report.metrics.summary().items()}
    tracker.log_metrics({**metrics, "eval_loss": report.loss}, "logging the evaluation metrics")
    for path in report.files.values():
        tracker.log_artifact(path, "evaluation")


def log_export(tracker: MlflowTracker, result: ExportResult) -> None:
    tracker.log_metrics(result.metrics(), "logging the export checks")
    for path in result.files.values():
        tracker.log_artifact(path, "export")


def table_rows(report: EvalReport) -> list[dict[str, Any]]:
    """The per-class table with rounded numbers: what the Prefect table artifact shows."""
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for row in report.metrics.table_rows()]


def evaluate_and_export(cfg: TrainConfig, mlflow_run_id: str | None, log: Log = print) -> dict[str, Any]:
    """Evaluate and (when `cfg.export`) export best_model.pth; returns small JSON-able results."""
    configure_threads(cfg.threads)
    best = trainer.checkpoint_path(cfg, ckpt.BEST)
    # The flow has decoded the val split already (memoized per process): no second decode.
    val = trainer.load_data(cfg, log)["val"]
    report = evaluate_checkpoint(best, Path(cfg.data_dir) / "val", cfg.eval_dir, device=resolve_device(cfg.device),
                                 split=val, log=log)
    exported = None
    if cfg.export:
        from harv_train.reporting.evaluation import load_trained_model

        state, model = load_trained_model(best)
        exported = export_model(model, state, val, cfg.export_dir, log=log)

    tracker = MlflowTracker(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, log)
    tracker.run_id = mlflow_run_id
    log_evaluation(tracker, report)
    if exported is not None:
        log_export(tracker, exported)
    return {
        "evaluation": report.summary(),
        "table": table_rows(report),
        "export": exported.summary() if exported else None,
        "tracking_failures": tracker.failures,
    }
