"""Prefect tasks that evaluate and export a checkpoint; each publishes its table or summary as an artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from harv_train.core.runtime import configure_threads
from harv_train.core.session import TrainingSession
from harv_train.reporting.evaluation import EvalReport, evaluate_checkpoint
from harv_train.reporting.export import LATENCY_RUNS, ExportResult, export_checkpoint
from harv_train.core import checkpoints as ckpt
from harv_train.core.calibration import Calibration
from harv_train.reporting.post_training import PostTraining, calibrate_checkpoint, evaluate_and_export, table_rows


def publish_table(report: EvalReport, where: str, key: str = "evaluation-report") -> None:
    create_table_artifact(key=key, table=table_rows(report),
                          description=f"Per-class precision, recall, F1 and support; accuracy "
                                      f"{report.metrics.accuracy:.4f} ({where})")


def publish_export(result: ExportResult) -> None:
    summary = result.summary()
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in summary["parity"]["max_abs_diff"].items())
    latency = ", ".join(f"{k} {v:.2f} ms" for k, v in summary["latency_ms"].items())
    env = summary["environment"]
    create_markdown_artifact(key="model-export", description="TorchScript and ONNX export of the best model", markdown=(
        f"# Export\n\nFiles: `{summary['files']['torchscript']}`, `{summary['files']['onnx']}`, "
        f"`{summary['files']['model_card']}`\n\nMax abs logit difference to PyTorch on "
        f"{summary['parity']['images']} val images: {diffs} (tolerance {summary['parity']['tolerance']:.0e})\n\n"
        f"CPU latency per image, batch 1, median of {env['runs']} runs, {env['threads']} threads on {env['cpu']}: "
        f"{latency}\n"))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(checkpoint: str, data: str, out: str) -> EvalReport:
    configure_threads(0)
    report = evaluate_checkpoint(checkpoint, data, out)
    publish_table(report, data)
    return report


@task(name="export", cache_policy=NO_CACHE)
def export_task(checkpoint: str, data: str, out: str, latency_runs: int = LATENCY_RUNS) -> ExportResult:
    configure_threads(0)
    result = export_checkpoint(checkpoint, data, out, latency_runs=latency_runs)
    publish_export(result)
    return result


@task(name="calibrate", cache_policy=NO_CACHE)
def calibrate_task(session: TrainingSession) -> Calibration:
    """The temperature of best_model.pth, fitted on the val images the session has already decoded."""
    cfg = session.cfg
    configure_threads(cfg.threads)
    return calibrate_checkpoint(cfg.checkpoints_dir / ckpt.BEST, session.splits()["val"], session.device)


@task(name="evaluate-and-export", cache_policy=NO_CACHE)
def evaluate_and_export_task(session: TrainingSession) -> PostTraining:
    """The training flow's last step: report and export of best_model.pth, on the val images the
    session has already decoded, and its report on the test images when there are any. The flow
    publishes the result (publish_table, publish_export) when the Prefect API answers: the export
    never waits on it."""
    cfg = session.cfg
    configure_threads(cfg.threads)
    splits = session.splits()
    return evaluate_and_export(cfg, splits["val"], session.device, splits.get("test"))
