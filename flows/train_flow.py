"""The training flow: `python flows/train_flow.py [--params FILE] [--set KEY=VALUE ...] [--resume]`.

Tasks, in order: load data; build the model and freeze its early layers (written as epoch 0);
one retried task per epoch; the final checkpoint; the best model to MLflow. Tasks pass the config,
epoch numbers and small summaries, never a model: every task reads and writes checkpoint files.
Importable for deployments: `from flows.train_flow import train_flow`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# Prefect's temporary server sends usage telemetry in the background; with no network it only
# fails noisily (and can race the flow for its SQLite database). Opt back in by setting it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if __package__ in (None, ""):  # run as a script: make the project packages importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python flows/train_flow.py",
        description="Fine-tune an ImageNet-pretrained model on an ImageFolder dataset, tracked in MLflow.",
    )
    parser.add_argument("--params", default="params.yaml", help="params YAML file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param; VALUE is YAML (repeatable): --set epochs=5 --set classes='[a, b]'")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in artifacts_dir (same MLflow run)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # first: bad arguments answer in 0.1 s; the server boots during the imports
    from harv_train.cli.commands import FastCommand
    from harv_train.config import load_config, parse_override

    _command = FastCommand(
        lambda: load_config((args := parse_args()).params, dict(map(parse_override, args.overrides))))

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows.evaluate_flow import evaluate_and_export_task
from harv_train.core import checkpoints as ckpt
from harv_train.core import trainer
from harv_train.cli.commands import run_flow_command
from harv_train.config import TrainConfig, load_config, parse_override, write_params_file
from harv_train.core.distributed import launch_epoch
from harv_train.errors import UserError
from harv_train.core.locking import artifacts_lock
from harv_train.cli.startup import EarlyServer, flow_server
from harv_train.core.runtime import configure_threads, resolve_device
from harv_train.reporting.summary import epochs_markdown
from harv_train.tracking.mlflow_tracker import MlflowTracker


def _log(message: str) -> None:
    get_run_logger().info(f"[train] {message}")


@task(name="load-data", cache_policy=NO_CACHE)
def load_data_task(cfg: TrainConfig) -> dict[str, Any]:
    summary = trainer.describe_data(trainer.load_data(cfg, _log))
    _log(f"Classes: {', '.join(summary['classes'])}")
    _log(f"Samples: {summary['train_images']} train, {summary['val_images']} val "
         f"(train per class: {summary['train_counts']})")
    if summary["skipped_images"]:
        _log(f"Skipped {len(summary['skipped_images'])} unreadable image(s)")
    return summary


@task(name="build-model", cache_policy=NO_CACHE)
def build_model_task(cfg: TrainConfig, classes: list[str], resume: bool, mlflow_run_id: str | None) -> dict[str, Any]:
    if resume:
        return trainer.resume_run(cfg, classes, _log)
    trainer.archive_previous_checkpoints(cfg, _log)
    return trainer.start_run(cfg, classes, mlflow_run_id, _log)


@task(name="train-epoch", cache_policy=NO_CACHE, task_run_name="epoch-{epoch}")
def train_epoch_task(cfg: TrainConfig, epoch: int) -> dict[str, Any]:
    # Restores from last.pth on entry: a retry redoes this epoch only, from the same state.
    if cfg.distributed.world_size > 1:
        return launch_epoch(cfg, epoch, _log)
    return trainer.run_epoch(cfg, epoch, _log)


@task(name="final-checkpoint", cache_policy=NO_CACHE)
def final_checkpoint_task(cfg: TrainConfig) -> dict[str, Any]:
    return trainer.finish_run(cfg)


@task(name="log-best-model", cache_policy=NO_CACHE)
def log_best_model_task(cfg: TrainConfig, mlflow_run_id: str) -> tuple[str | None, list[str]]:
    """Returns the model URI (None on failure) and what failed."""
    tracker = MlflowTracker(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, _log)
    tracker.run_id = mlflow_run_id
    state = ckpt.load_checkpoint(trainer.checkpoint_path(cfg, ckpt.BEST))
    model = trainer.load_model_from_checkpoint(state)
    # The checkpoint's epoch names it within the run: a resume that found no better model logs none.
    tags = {"harv_train.best_epoch": str(state["epoch"])}
    return tracker.log_model(model, trainer.input_example(state), tags), tracker.failures


@task(name="register-model", cache_policy=NO_CACHE)
def register_model_task(cfg: TrainConfig, mlflow_run_id: str, model_uri: str, val_acc: float) -> list[str]:
    """Registers the logged best model under registered_model_name (alias champion only if better);
    returns what failed."""
    tracker = MlflowTracker(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, _log)
    tracker.run_id = mlflow_run_id
    registration = tracker.register_model(cfg.registered_model_name, model_uri, val_acc)
    if registration:
        _log(registration.summary())
    return tracker.failures


def _finish_tracking(cfg: TrainConfig, tracker: MlflowTracker, summary: dict[str, Any], params_copy: Path) -> None:
    """Everything the MLflow run holds beyond per-epoch metrics; catches up after an outage."""
    if tracker.down:
        tracker.reconnect()
    if tracker.run_id is None and not tracker.down:
        tracker.start(None, runtime.flow_run.name, _tags())
    tracker.log_params(cfg.flat_dict())
    tracker.log_epochs(summary["history"])
    tracker.log_metrics({"best_val_acc": summary["best_val_acc"], "best_epoch": summary["best_epoch"],
                         "epochs_completed": summary["epoch"]})
    best = trainer.checkpoint_path(cfg, ckpt.BEST)
    for path in (best, trainer.checkpoint_path(cfg, ckpt.FINAL), params_copy):
        tracker.log_artifact(path, "checkpoints" if path.suffix == ".pth" else None)
    if tracker.run_id and not tracker.down:
        model_uri, failures = log_best_model_task(cfg, tracker.run_id)
        tracker.record_failures(failures)
        if model_uri:
            _log(f"Logged the best model to MLflow: {model_uri}")
        if model_uri and cfg.registered_model_name:
            tracker.record_failures(register_model_task(cfg, tracker.run_id, model_uri, summary["best_val_acc"]))


def _tags() -> dict[str, str]:
    return {
        "prefect.flow_run_id": str(runtime.flow_run.id),
        "prefect.flow_run_name": str(runtime.flow_run.name),
        "prefect.deployment": str(runtime.deployment.name or ""),
    }


@flow(name="train", log_prints=True)
def train_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, resume: bool = False):
    """Fine-tune an ImageNet model on an ImageFolder dataset; see params.yaml for every setting."""
    try:
        cfg = load_config(params_file, overrides)
        with artifacts_lock(cfg.artifacts_dir):
            # Before anything is written or opened (checkpoints moved aside, an MLflow run): a
            # deployment's bad input ends like the command line's. (There a second pass, 0.07 s.)
            trainer.check_inputs(cfg, resume, _log)
            return _train(cfg, resume)
    except UserError as exc:
        # Bad input ends the run with its one-line message, not a traceback.
        get_run_logger().error(f"[train] error: {exc}")
        return Failed(message=str(exc))


def _train(cfg: TrainConfig, resume: bool):
    started = time.perf_counter()
    _log(f"Device: {resolve_device(cfg.device)}, {configure_threads(cfg.threads)} threads")
    data = load_data_task(cfg)

    tracker = MlflowTracker(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, _log)
    previous_run = trainer.previous_mlflow_run_id(cfg) if resume else None
    tracker.start(previous_run, runtime.flow_run.name, _tags())
    try:
        return _train_tracked(cfg, resume, data, tracker, previous_run, started)
    except BaseException as exc:
        # The MLflow run shows how the flow run ended (--resume reopens it); a SIGKILL leaves it RUNNING.
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _train_tracked(cfg: TrainConfig, resume: bool, data: dict[str, Any], tracker: MlflowTracker,
                   previous_run: str | None, started: float):
    classes = data["classes"]
    if tracker.run_id:
        if previous_run:
            tracker.set_tags(_tags())  # the run now continues under this flow run
        tracker.log_params(cfg.flat_dict())
        tracker.log_metrics({"train_images": data["train_images"], "val_images": data["val_images"],
                             "skipped_images": len(data["skipped_images"])}, "logging dataset size")
        _log(f"MLflow run {tracker.run_id} in {cfg.mlflow_tracking_uri} (experiment {cfg.mlflow_experiment})")

    summary = build_model_task(cfg, classes, resume, tracker.run_id)
    history = list(summary["history"])
    if history:
        tracker.log_epochs(history)  # epochs a killed run finished but never logged
    epoch_task = train_epoch_task.with_options(retries=cfg.epoch_retries, retry_delay_seconds=1)
    stopped = summary["stopped_early"]
    for epoch in range(summary["epoch"], cfg.epochs):
        if stopped:
            break
        metrics = epoch_task(cfg, epoch)
        history.append(metrics)
        tracker.log_epochs(history)
        stopped = metrics["stop"]

    summary = final_checkpoint_task(cfg)
    params_copy = cfg.checkpoints_dir / "params.yaml"
    write_params_file(cfg, params_copy)
    _finish_tracking(cfg, tracker, summary, params_copy)
    # Report, plots and export of best_model.pth, logged to the same MLflow run (when it is reachable).
    post = evaluate_and_export_task(cfg, None if tracker.down else tracker.run_id)
    tracker.record_failures(post["tracking_failures"])
    best = trainer.checkpoint_path(cfg, ckpt.BEST)
    _log(f"Best model: val accuracy {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']} -> {best}")
    _log(f"Final model: {trainer.checkpoint_path(cfg, ckpt.FINAL)}")
    _log(f"Total time: {time.perf_counter() - started:.1f}s")

    url = tracker.run_url()
    create_markdown_artifact(
        key="training-summary",
        markdown=epochs_markdown(summary, cfg, tracker.run_id, url, tracker.failures),
        description="Per-epoch metrics of this training run",
    )
    if url:
        create_link_artifact(key="mlflow-run", link=url, link_text="MLflow run",
                             description=f"MLflow run {tracker.run_id} ({cfg.mlflow_tracking_uri})")
    if tracker.down:
        # Visible, not silent: the run fails, and --resume logs what is missing once MLflow is back.
        return Failed(message=(
            f"training finished and checkpoints are in {cfg.checkpoints_dir}, but MLflow logging failed "
            f"({len(tracker.failures)} call(s); first: {tracker.failures[0]}): rerun with --resume once "
            f"{cfg.mlflow_tracking_uri} is reachable to log the run"
        ))
    if tracker.failures:
        _log(f"WARNING: MLflow failed {len(tracker.failures)} time(s) during the run; "
             "everything missed was logged at the end")
    tracker.end("FINISHED")
    return Completed(message=f"best val accuracy {summary['best_val_acc']:.4f}", data=summary)


def main(argv: list[str] | None = None, early_server: EarlyServer | None = None) -> int:
    args = parse_args(argv)

    def start():
        overrides = dict(parse_override(item) for item in args.overrides)
        cfg = load_config(args.params, overrides)
        # Check the inputs before the flow begins: bad input shows one line, no traceback, and no flow run.
        with artifacts_lock(cfg.artifacts_dir):
            trainer.check_inputs(cfg, args.resume, lambda m: print(f"[train] {m}"))
            with flow_server(early_server):
                return train_flow(params_file=args.params, overrides=overrides, resume=args.resume, return_state=True)

    return run_flow_command(start)[0]


if __name__ == "__main__":
    _command.run(lambda early_server: main(early_server=early_server))
