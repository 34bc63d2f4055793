"""The training flow: `python flows/train_flow.py [--params FILE] [--set KEY=VALUE ...] [--resume]`.

Read `train_flow` top to bottom: load data; check the inputs; start or resume the run (epoch 0 is
the pretrained, frozen model); one retried task per epoch; the final checkpoint; log to MLflow;
evaluate and export the best model. The flow owns the run's `TrainingSession` (what stays in memory)
and its one `MlflowTracker`; tasks get the session and small values and return typed results, which
the flow alone logs. Importable for deployments: `from flows.train_flow import train_flow`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Annotated

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


def load_command_line_config(args: argparse.Namespace):
    from harv_train.config import load_config, parse_override

    return load_config(args.params, dict(map(parse_override, args.overrides)))


if __name__ == "__main__":  # first: bad arguments answer in 0.1 s; the server boots during the imports
    from harv_train.cli.startup import FastCommand

    _command = FastCommand(lambda: load_command_line_config(parse_args()))

import logging

from prefect import flow, get_run_logger, runtime
from pydantic import Field
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.exceptions import ExternalSignal
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Completed, Failed

from harv_train.cli.commands import EXIT_ORCHESTRATOR_UNREACHABLE, end_now, run_flow_command
from harv_train.cli.startup import EarlyServer, flow_server
from harv_train.config import ParamOverrides, TrainConfig, load_config, write_params_file
from harv_train.core import checkpoints as ckpt
from harv_train.core.checks import check_inputs
from harv_train.core.data import require_data_dir
from harv_train.core.lineage import source_tags
from harv_train.core.locking import artifacts_lock
from harv_train.core.run_state import RunSummary
from harv_train.core.runtime import configure_threads
from harv_train.core.session import DataSummary, TrainingSession
from harv_train.errors import UserError
from harv_train.reporting.summary import epochs_markdown
from harv_train.sweep.trial import SweepTrial
from harv_train.tracking.mlflow_tracker import MlflowTracker
from tasks.crash_resume import plan_crash_resume
from tasks.evaluation import calibrate_task, evaluate_and_export_task, publish_export, publish_table
from tasks.logs import library_logs_in_run
from tasks.orchestrator import API_ERRORS, CALL_RETRIES, OrchestratorLink
from tasks.training import (
    final_checkpoint_task,
    load_data_task,
    resume_run_task,
    start_run_task,
    train_epoch_task,
)

logger = logging.getLogger("harv_train.flows.train")


@flow(name="train", log_prints=True)
def train_flow(params_file: str | None = "params.yaml", overrides: ParamOverrides | None = None, resume: bool = False,
               resume_after_crash: str | None = None,
               max_crash_resumes: Annotated[int, Field(ge=0, le=100)] = 3,
               sweep_trial: SweepTrial | None = None, run_tags: dict[str, str] | None = None):
    """Fine-tune an ImageNet model on an ImageFolder dataset.

    `params_file` is the base (none: the documented defaults); each field set in `overrides` replaces
    its value. A field left empty keeps the file's value. `resume_after_crash` (set by the deployment's
    trigger on a Crashed run, docs/deployments.md) resumes that run with its own params, at most
    `max_crash_resumes` times in a row. A sweep (flows/sweep_flow.py) sets `sweep_trial`, the Optuna
    trial each epoch's val_acc is reported to (its pruner may end the run early, state Pruned), and
    `run_tags`, added to the MLflow run (its parent run)."""
    # The Prefect API may go away mid-run; training does not wait for it (tasks/orchestrator.py).
    link = OrchestratorLink.current()
    with library_logs_in_run("[train]"), link.quiet_while_down():
        try:
            if resume_after_crash:
                plan = plan_crash_resume(resume_after_crash, max_crash_resumes)
                get_run_logger().info(f"[train] automatic resume {plan.attempt} of at most {plan.max_crash_resumes}: "
                                      f"flow run {plan.crashed_run} crashed")
                params_file, resume = plan.params_file, True
                overrides = None if plan.overrides is None else ParamOverrides.model_validate(plan.overrides)
            cfg = load_config(params_file, overrides)
            require_data_dir(cfg.data_dir)  # a missing data_dir writes nothing, not even the lock file
            with artifacts_lock(cfg.artifacts_dir):
                session = TrainingSession(cfg)
                data = load_data_task(session)  # decoding proves every image readable
                # Before anything is written or opened (checkpoints moved aside, an MLflow run): a
                # deployment's bad input ends like the command line's.
                check_inputs(cfg, resume, list(data.classes))
                link.final_state = _train(cfg, session, data, resume, link, sweep_trial, run_tags or {})
        except UserError as exc:
            # Bad input ends the run with its one-line message, not a traceback.
            get_run_logger().error(f"[train] error: {exc}")
            link.final_state = Failed(message=str(exc))
        return link.final_state


def _train(cfg: TrainConfig, session: TrainingSession, data: DataSummary, resume: bool, link: OrchestratorLink,
           sweep_trial: SweepTrial | None, run_tags: dict[str, str]):
    started = time.perf_counter()
    logger.info(f"Device: {session.device}, {configure_threads(cfg.threads)} threads")
    tracker = MlflowTracker(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
    previous_run = ckpt.load_checkpoint(session.last_path).get("mlflow_run_id") if resume else None
    tracker.start(previous_run, runtime.flow_run.name, _tags(run_tags))
    try:
        summary, pruned_at = _train_tracked(cfg, session, data, resume, tracker, previous_run, link, sweep_trial,
                                            run_tags)
    except BaseException as exc:
        # The MLflow run shows how the flow run ended (--resume reopens it): stopped from outside (Ctrl-C,
        # SIGTERM from a scheduler, which Prefect raises as TerminationSignal) or failed. A SIGKILL
        # leaves it RUNNING.
        tracker.end("KILLED" if isinstance(exc, (KeyboardInterrupt, ExternalSignal)) else "FAILED")
        raise
    logger.info(f"Total time: {time.perf_counter() - started:.1f}s")
    _publish_summary(cfg, tracker, summary, link)
    outage = ""
    if link.was_unreachable:
        # A short, bounded wait: if the API is back by then, this flow run's final state reaches it.
        link.wait_until_back(cfg.prefect_outage_wait_s)
        outage = f"; {link.summary()}"
        tracker.set_tags({"harv_train.orchestrator_unreachable": link.summary()})
    if tracker.down:
        # Visible, not silent: the run fails, and --resume logs what is missing once MLflow is back.
        retry = "the credentials are set" if tracker.auth_refused else f"{cfg.mlflow_tracking_uri} is reachable"
        return Failed(message=(
            f"training finished and checkpoints are in {cfg.checkpoints_dir}, but MLflow logging failed "
            f"({len(tracker.failures)} call(s); first: {tracker.failures[0]}): rerun with --resume once "
            f"{retry} to log the run"
        ))
    if tracker.failures:
        logger.warning(f"WARNING: MLflow failed {len(tracker.failures)} time(s) during the run; "
                       "everything missed was logged at the end")
    if pruned_at is not None:  # the sweep's pruner ended it: a clean end, under its own name
        tracker.set_tags({"sweep.pruned": "true", "sweep.pruned_at_epoch": str(pruned_at)})
        tracker.end("FINISHED")
        return Completed(name="Pruned", data=summary, message=(
            f"pruned by the sweep after epoch {pruned_at}; best val accuracy {summary.best_val_acc:.4f}{outage}"))
    tracker.end("FINISHED")
    return Completed(message=f"best val accuracy {summary.best_val_acc:.4f}{outage}", data=summary)


def _train_tracked(cfg: TrainConfig, session: TrainingSession, data: DataSummary, resume: bool,
                   tracker: MlflowTracker, previous_run: str | None, link: OrchestratorLink,
                   sweep_trial: SweepTrial | None, run_tags: dict[str, str]) -> tuple[RunSummary, int | None]:
    """The run's summary, and the epoch after which the sweep's pruner stopped it (None: not pruned)."""
    if tracker.run_id:
        if previous_run:
            tracker.set_tags(_tags(run_tags))  # the run now continues under this flow run
        tracker.log_params(cfg.flat_dict())
        tracker.log_metrics(_dataset_size(data), "logging dataset size")
        tracker.log_dataset(session.dataset_info())
        logger.info(f"MLflow run {tracker.run_id} in {cfg.mlflow_tracking_uri} (experiment {cfg.mlflow_experiment})")

    summary = resume_run_task(session) if resume else start_run_task(session, tracker.run_id)
    history = list(summary.history)
    if history:
        tracker.log_epochs(history)  # epochs a killed run finished but never logged
    if history and sweep_trial is not None:  # ... nor reported to its sweep (killed in between)
        from harv_train.sweep.study import report_epoch

        for done in history:
            report_epoch(sweep_trial, done.epoch, done.val_acc, may_prune=False)
    epoch_task = train_epoch_task.with_options(retries=cfg.epoch_retries, retry_delay_seconds=1)
    stopped = summary.stopped_early
    pruned_at = None
    progress = _progress(link, None, 100.0 if stopped else 100 * summary.epoch / cfg.epochs,
                         f"{summary.epoch} of {cfg.epochs} epochs done")
    for epoch in range(summary.epoch, cfg.epochs):
        if stopped:
            break
        metrics = epoch_task(session, epoch)
        history.append(metrics)
        tracker.log_epochs(history)
        stopped = metrics.stop
        if sweep_trial is not None and _report_to_sweep(sweep_trial, metrics, may_prune=metrics.epoch < cfg.epochs):
            stopped = pruned_at = metrics.epoch
        _progress(link, progress, 100.0 if stopped else 100 * metrics.epoch / cfg.epochs,
                  f"Epoch {metrics.epoch} of {cfg.epochs}: val accuracy {metrics.val_acc:.4f}"
                  + (", stopped early" if stopped else ""))

    summary = final_checkpoint_task(session)
    params_copy = cfg.checkpoints_dir / "params.yaml"
    write_params_file(cfg, params_copy)
    calibration = calibrate_task(session) if cfg.calibrate else None  # before the model is logged: it carries T
    _log_run(cfg, session, tracker, summary, params_copy, data, run_tags)
    if calibration and not calibration.errors:
        logger.warning(f"Temperature kept at 1: best_model.pth gets all {calibration.images} val images right, which "
                       "cannot show how sure it should be; a larger val split, with images it gets wrong, can.")
    elif calibration:
        logger.info(f"Calibration on {calibration.images} val images: temperature {calibration.temperature:.3f}, "
                    f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}, "
                    f"NLL {calibration.nll_before:.4f} -> {calibration.nll_after:.4f}")
        tracker.log_metrics({"temperature": calibration.temperature, "val_ece": calibration.ece_before,
                             "val_ece_calibrated": calibration.ece_after, "val_nll": calibration.nll_before,
                             "val_nll_calibrated": calibration.nll_after}, "logging the calibration")
    # Report, plots and export of best_model.pth, logged to the same MLflow run when it is reachable.
    post = evaluate_and_export_task(session)
    link.record("the evaluation artifact", lambda: publish_table(post.evaluation, f"{cfg.data_dir}: val split"))
    if post.test:
        link.record("the test artifact", lambda: publish_table(post.test, f"{cfg.data_dir}: test split", "test-report"))
    if post.export:
        link.record("the export artifact", lambda: publish_export(post.export))
    if not tracker.down:
        tracker.log_evaluation(post.evaluation)
        if post.test:  # reported only: best epoch and champion were decided on val before this
            tracker.log_evaluation(post.test, prefix="test", folder="test")
            logger.info(f"Test split: accuracy {post.test.metrics.accuracy:.4f}, macro F1 "
                        f"{post.test.metrics.macro['f1']:.4f} on {post.test.metrics.total} images")
        if post.export:
            tracker.log_export(post.export)
    logger.info(f"Best model: val accuracy {summary.best_val_acc:.4f} at epoch {summary.best_epoch} -> "
                f"{cfg.checkpoints_dir / ckpt.BEST}")
    logger.info(f"Final model: {cfg.checkpoints_dir / ckpt.FINAL}")
    return summary, pruned_at


def _dataset_size(data: DataSummary) -> dict[str, float]:
    sizes = {"train_images": data.train_images, "val_images": data.val_images,
             "skipped_images": len(data.skipped_images)}
    if data.test_images:
        sizes["test_images"] = data.test_images
    return sizes


def _report_to_sweep(trial: SweepTrial, metrics, may_prune: bool) -> bool:
    """Report the epoch's val_acc to the sweep's Optuna trial; True when its pruner stops the run
    (never after the last epoch: the run is complete)."""
    from harv_train.sweep.study import report_epoch  # Optuna only for a sweep's trials

    if report_epoch(trial, metrics.epoch, metrics.val_acc, may_prune):
        logger.info(f"Pruned by the sweep after epoch {metrics.epoch} (val accuracy {metrics.val_acc:.4f} "
                    f"below the median of earlier trials; trial {trial.trial_number})")
        return True
    return False


def _log_run(cfg: TrainConfig, session: TrainingSession, tracker: MlflowTracker, summary: RunSummary,
             params_copy: Path, data: DataSummary, run_tags: dict[str, str]) -> None:
    """Everything the MLflow run holds beyond per-epoch metrics; catches up after an outage."""
    if tracker.down:
        tracker.reconnect()
    if tracker.run_id is None and not tracker.down:
        if tracker.start(None, runtime.flow_run.name, _tags(run_tags)):
            ckpt.record_mlflow_run_id(cfg.checkpoints_dir, tracker.run_id)  # what --resume continues
    tracker.log_params(cfg.flat_dict())
    tracker.log_metrics(_dataset_size(data), "logging dataset size")  # a run opened late has none yet
    tracker.log_dataset(session.dataset_info())  # a run opened only now (not again for one that has it)
    tracker.log_epochs(summary.history)
    tracker.log_metrics({"best_val_acc": summary.best_val_acc, "best_val_macro_f1": summary.best_score("val_macro_f1"),
                         "best_epoch": summary.best_epoch, "epochs_completed": summary.epoch})
    best = cfg.checkpoints_dir / ckpt.BEST
    for path in (best, cfg.checkpoints_dir / ckpt.FINAL, params_copy):
        tracker.log_artifact(path, "checkpoints" if path.suffix == ".pth" else None)
    for path in session.write_split_lists(cfg.splits_dir):  # which image trained, chose or tested
        tracker.log_artifact(path, "splits")
    if not tracker.run_id or tracker.down:
        return
    state = ckpt.load_checkpoint(best)
    # The checkpoint's epoch names it within the run: a resume that found no better model logs none.
    # Logged as a pickle-free pyfunc that takes image files (harv_train/tracking/pyfunc_model.py).
    model_uri = tracker.log_model(state, {"harv_train.best_epoch": str(state["epoch"])})
    if model_uri:
        logger.info(f"Logged the best model to MLflow: {model_uri}")
    if model_uri and cfg.registered_model_name:
        registration = tracker.register_model(cfg.registered_model_name, model_uri,
                                              summary.best_score(cfg.select_metric), cfg.select_metric)
        if registration:
            logger.info(registration.summary())


def _progress(link: OrchestratorLink, artifact_id, percent: float, description: str):
    """Create (artifact_id None) or update the run's `training-progress` artifact, which the Prefect UI
    shows while the run trains; returns its id. Only a view: skipped while the Prefect API is away."""
    if artifact_id is None:
        return link.record("the progress artifact", lambda: create_progress_artifact(
            percent, key="training-progress", description=description))
    link.record("the progress artifact", lambda: update_progress_artifact(artifact_id, percent, description=description))
    return artifact_id


def _publish_summary(cfg: TrainConfig, tracker: MlflowTracker, summary: RunSummary, link: OrchestratorLink) -> None:
    """The run's Prefect artifacts: the per-epoch table and the link to its MLflow run."""
    url = tracker.run_url()
    link.record("the summary artifact", lambda: create_markdown_artifact(
        key="training-summary",
        markdown=epochs_markdown(summary, cfg, tracker.run_id, url, tracker.failures),
        description="Per-epoch metrics of this training run",
    ))
    if url:
        link.record("the MLflow link artifact", lambda: create_link_artifact(
            key="mlflow-run", link=url, link_text="MLflow run",
            description=f"MLflow run {tracker.run_id} ({cfg.mlflow_tracking_uri})"))


def _tags(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "prefect.flow_run_id": str(runtime.flow_run.id),
        "prefect.flow_run_name": str(runtime.flow_run.name),
        "prefect.deployment": str(runtime.deployment.name or ""),
        # The worker that started this flow run (a process worker sets it), to see where a run trained.
        **({"prefect.worker": os.environ["PREFECT__WORKER_NAME"]} if os.environ.get("PREFECT__WORKER_NAME") else {}),
        **source_tags(Path(__file__).resolve().parent),  # the code's git commit and dirty flag, in a checkout
        **(extra or {}),
    }


def main(argv: list[str] | None = None, early_server: EarlyServer | None = None) -> int:
    args = parse_args(argv)

    links: list[OrchestratorLink] = []

    def start():
        cfg = load_command_line_config(args)
        # Check the inputs before the flow begins: bad input shows one line, no traceback, and no flow run.
        require_data_dir(cfg.data_dir)  # a missing data_dir writes nothing, not even the lock file
        with artifacts_lock(cfg.artifacts_dir):
            check_inputs(cfg, args.resume)
            with flow_server(early_server):
                link = OrchestratorLink.from_settings()
                links.append(link)
                # The engine's own calls (the flow run's states) retry 2 s then 4 s, not Prefect's
                # default 5 times up to 32 s: the flow itself waits for an API that went away.
                with link.in_use(), link.quiet_while_down(), temporary_settings(
                        updates={PREFECT_CLIENT_MAX_RETRIES: CALL_RETRIES}):
                    try:
                        # The resolved params whole, on no base file: the flow run records exactly what it
                        # trains with, and a --set to null survives (an empty field of ParamOverrides
                        # means "unset").
                        return train_flow(params_file=None, overrides=ParamOverrides.model_validate(cfg.to_dict()),
                                          resume=args.resume, return_state=True)
                    except API_ERRORS:
                        if link.final_state is None:  # the flow never ended: not an outage at the end
                            raise
                        return link.final_state  # the flow ended, but Prefect could not be told

    code = run_flow_command(start)[0]
    link = links[0] if links else None
    if link is None or not link.was_unreachable:
        return code
    if not link.down:
        print(f"[train] warning: {link.summary()} during this run; its Prefect records of that time are "
              "missing, MLflow has the whole run", file=sys.stderr, flush=True)
        return code
    print(f"[train] warning: {link.summary()}: this flow run's final state did not reach it (the Prefect UI "
          "shows the run Running); training, checkpoints and MLflow are complete (docs/failures.md)",
          file=sys.stderr, flush=True)
    # Prefect's queues of log lines and events would retry the absent API at exit for minutes.
    end_now(EXIT_ORCHESTRATOR_UNREACHABLE if code == 0 else code)


if __name__ == "__main__":
    _command.run(lambda early_server: main(early_server=early_server))
