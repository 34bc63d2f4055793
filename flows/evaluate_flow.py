"""Evaluate (and export) any checkpoint on any ImageFolder split:

    python flows/evaluate_flow.py --checkpoint PATH --data DIR/val [--out DIR] [--export] [--export-dir DIR]

Writes the same report a training run writes (harv_train/reporting/evaluation.py) to `--out` (default:
ARTIFACTS_DIR/eval/ for a checkpoint in ARTIFACTS_DIR/checkpoints/), and with `--export` the
TorchScript and ONNX files (harv_train/reporting/export.py) to `--export-dir` (default ARTIFACTS_DIR/export/).
Also holds `evaluate_and_export_task`, the step the training flow runs after its last epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # see flows/train_flow.py

if __package__ in (None, ""):  # run as a script: make the project packages importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python flows/evaluate_flow.py",
        description="Evaluate a harv-train checkpoint on a folder with one subfolder of images per class.",
    )
    parser.add_argument("--checkpoint", required=True, help="a .pth written by flows/train_flow.py")
    parser.add_argument("--data", required=True, help="the split to evaluate on, e.g. data/processed/val")
    parser.add_argument("--out", help="report directory (default: ARTIFACTS_DIR/eval beside the checkpoints)")
    parser.add_argument("--export", action="store_true", help="also export to TorchScript and ONNX")
    parser.add_argument("--export-dir", help="export directory (default: ARTIFACTS_DIR/export)")
    parser.add_argument("--latency-runs", type=int,
                        help="timed runs per runtime for the CPU latency (default: harv_train/reporting/export.py LATENCY_RUNS)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # first: bad arguments answer at once; the server boots during the imports
    from harv_train.cli.commands import FastCommand

    _command = FastCommand(parse_args)

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from harv_train.reporting import post_training
from harv_train.cli.commands import run_flow_command
from harv_train.config import TrainConfig
from harv_train.errors import UserError
from harv_train.reporting.evaluation import check_class_folders, default_out_dir, evaluate_checkpoint, load_trained_model
from harv_train.reporting.export import LATENCY_RUNS, export_checkpoint
from harv_train.cli.startup import EarlyServer, flow_server
from harv_train.core.runtime import configure_threads


def _log(message: str) -> None:
    get_run_logger().info(f"[evaluate] {message}")


def _publish_table(rows: list[dict[str, Any]], accuracy: float, where: str) -> None:
    create_table_artifact(key="evaluation-report", table=rows,
                          description=f"Per-class precision, recall, F1 and support; accuracy {accuracy:.4f} ({where})")


def _publish_export(summary: dict[str, Any]) -> None:
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
def evaluate_task(checkpoint: str, data: str, out: str) -> dict[str, Any]:
    configure_threads(0)
    report = evaluate_checkpoint(checkpoint, data, out, log=_log)
    _publish_table(post_training.table_rows(report), report.metrics.accuracy, data)
    return report.summary()


@task(name="export", cache_policy=NO_CACHE)
def export_task(checkpoint: str, data: str, out: str, latency_runs: int = LATENCY_RUNS) -> dict[str, Any]:
    configure_threads(0)
    summary = export_checkpoint(checkpoint, data, out, latency_runs=latency_runs, log=_log).summary()
    _publish_export(summary)
    return summary


@task(name="evaluate-and-export", cache_policy=NO_CACHE)
def evaluate_and_export_task(cfg: TrainConfig, mlflow_run_id: str | None) -> dict[str, Any]:
    """The training flow's last step: report and export of best_model.pth, logged to the run."""
    result = post_training.evaluate_and_export(cfg, mlflow_run_id, lambda m: get_run_logger().info(f"[train] {m}"))
    _publish_table(result["table"], result["evaluation"]["accuracy"], f"{cfg.data_dir}/val")
    if result["export"]:
        _publish_export(result["export"])
    return result


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, data: str, out: str | None = None, export: bool = False,
                  export_dir: str | None = None, latency_runs: int = LATENCY_RUNS):
    """Evaluate a harv-train checkpoint on an ImageFolder split; optionally export it."""
    try:
        result = {"evaluation": evaluate_task(checkpoint, data, out or str(default_out_dir(checkpoint, "eval")))}
        if export:
            out_export = export_dir or str(default_out_dir(checkpoint, "export"))
            result["export"] = export_task(checkpoint, data, out_export, latency_runs)
        return result
    except UserError as exc:
        get_run_logger().error(f"[evaluate] error: {exc}")
        return Failed(message=str(exc))


def main(argv: list[str] | None = None, early_server: EarlyServer | None = None) -> int:
    args = parse_args(argv)

    def start():
        # Check the inputs before the flow begins: bad input shows one line, no traceback, no flow run.
        state, _ = load_trained_model(args.checkpoint)
        check_class_folders(Path(args.data), state["classes"])
        with flow_server(early_server, "[evaluate]"):
            return evaluate_flow(checkpoint=args.checkpoint, data=args.data, out=args.out, export=args.export,
                                 export_dir=args.export_dir, latency_runs=args.latency_runs or LATENCY_RUNS,
                                 return_state=True)

    code, flow_state = run_flow_command(start)
    if code:
        return code
    result = flow_state.result()
    evaluation = result["evaluation"]
    print(f"accuracy {evaluation['accuracy']:.4f}, macro F1 {evaluation['macro_f1']:.4f} on "
          f"{evaluation['images']} images; report in {evaluation['out_dir']}")
    if result.get("export"):
        print(f"exported to {result['export']['out_dir']}")
    return 0


if __name__ == "__main__":
    _command.run(lambda early_server: main(early_server=early_server))
