"""Evaluate (and export) any checkpoint on any ImageFolder split:

    python flows/evaluate_flow.py --checkpoint PATH --data DIR/val [--out DIR] [--export] [--export-dir DIR]

Writes the same report a training run writes (harv_train/reporting/evaluation.py) to `--out` (default:
ARTIFACTS_DIR/eval/ for a checkpoint in ARTIFACTS_DIR/checkpoints/), and with `--export` the
TorchScript and ONNX files (harv_train/reporting/export.py) to `--export-dir` (default ARTIFACTS_DIR/export/).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    from harv_train.cli.startup import FastCommand

    _command = FastCommand(parse_args)

from prefect import flow, get_run_logger
from prefect.states import Failed

from harv_train.cli.commands import run_flow_command
from harv_train.cli.startup import EarlyServer, flow_server
from harv_train.errors import UserError
from harv_train.reporting.evaluation import check_class_folders, default_out_dir, load_trained_model
from harv_train.reporting.export import LATENCY_RUNS
from tasks.evaluation import evaluate_task, export_task
from tasks.logs import library_logs_in_run


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, data: str, out: str | None = None, export: bool = False,
                  export_dir: str | None = None, latency_runs: int = LATENCY_RUNS):
    """Evaluate a harv-train checkpoint on an ImageFolder split; optionally export it."""
    with library_logs_in_run("[evaluate]"):
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
    print(f"accuracy {evaluation.metrics.accuracy:.4f}, macro F1 {evaluation.metrics.macro['f1']:.4f} on "
          f"{evaluation.metrics.total} images of the {evaluation.split} split; report in {evaluation.out_dir}")
    if result.get("export"):
        print(f"exported to {result['export'].out_dir}")
    return 0


if __name__ == "__main__":
    _command.run(lambda early_server: main(early_server=early_server))
