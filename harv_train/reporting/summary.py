"""Human-readable summaries of a run: the Prefect markdown artifact."""

from __future__ import annotations

from harv_train.config import TrainConfig
from harv_train.core.run_state import RunSummary


def epochs_markdown(
    summary: RunSummary,
    cfg: TrainConfig,
    mlflow_run_id: str | None,
    mlflow_url: str | None,
    tracking_failures: list[str],
) -> str:
    lines = [
        f"# Training run: {cfg.model_name}",
        "",
        f"Best val accuracy **{summary.best_val_acc:.4f}** at epoch {summary.best_epoch} "
        f"of {summary.epoch}" + (" (stopped early)" if summary.stopped_early else ""),
        "",
        "| epoch | train loss | train acc | val loss | val acc | lr | train s | val s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in summary.history:
        mark = " *" if m.epoch == summary.best_epoch else ""
        lines.append(
            f"| {m.epoch}{mark} | {m.train_loss:.4f} | {m.train_acc:.4f} | {m.val_loss:.4f} | "
            f"{m.val_acc:.4f} | {m.lr:.2g} | {m.train_time_s:.1f} | {m.val_time_s:.1f} |"
        )
    lines += ["", f"Checkpoints: `{cfg.checkpoints_dir}` (best_model.pth, final_model.pth)", ""]
    if mlflow_run_id:
        where = f"[{mlflow_run_id}]({mlflow_url})" if mlflow_url else mlflow_run_id
        lines.append(f"MLflow run {where} in `{cfg.mlflow_tracking_uri}`, experiment `{cfg.mlflow_experiment}`.")
        if not cfg.mlflow_tracking_uri.startswith(("http://", "https://")):
            lines.append(f"Open it with `mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri}`.")
    if tracking_failures:
        lines += ["", "**MLflow logging failed:**", ""] + [f"- {f}" for f in tracking_failures[:20]]
    return "\n".join(lines) + "\n"
