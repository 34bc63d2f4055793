"""The training flow's Prefect tasks: thin wrappers around `TrainingSession`.

They take the flow's session (it never leaves the process: no task caches or persists it) and
small values, and return typed results. None of them talks to MLflow: the flow logs what they return.
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from harv_train.core import checkpoints as ckpt
from harv_train.core.distributed import launch_epoch
from harv_train.core.imbalance import imbalance_warning
from harv_train.core.run_state import EpochMetrics, RunSummary
from harv_train.core.session import DataSummary, TrainingSession

logger = logging.getLogger("harv_train.tasks")


@task(name="load-data", cache_policy=NO_CACHE)
def load_data_task(session: TrainingSession) -> DataSummary:
    data = session.describe_data()
    logger.info(f"Classes: {', '.join(data.classes)}")
    logger.info(f"Samples: {data.train_images} train, {data.val_images} val"
                + (f", {data.test_images} test" if data.test_images else "")
                + f" (train per class: {data.train_counts})")
    warning = imbalance_warning(data.train_counts)
    if warning:
        logger.warning(warning)
    if data.skipped_images:
        logger.info(f"Skipped {len(data.skipped_images)} unreadable image(s)")
    return data


@task(name="start-run", cache_policy=NO_CACHE)
def start_run_task(session: TrainingSession, mlflow_run_id: str | None) -> RunSummary:
    """Moves an earlier run's checkpoints aside, then writes epoch 0."""
    cfg = session.cfg
    kept = ckpt.archive_previous_checkpoints(cfg.checkpoints_dir, (cfg.eval_dir, cfg.export_dir, cfg.test_eval_dir, cfg.splits_dir))
    if kept:
        logger.info(f"Kept the earlier run's checkpoints in {kept}")
    return session.start(mlflow_run_id)


@task(name="resume-run", cache_policy=NO_CACHE)
def resume_run_task(session: TrainingSession) -> RunSummary:
    return session.resume()


@task(name="train-epoch", cache_policy=NO_CACHE, task_run_name="epoch-{epoch}")
def train_epoch_task(session: TrainingSession, epoch: int) -> EpochMetrics:
    # A retry runs in the same session, which dropped its live state when the attempt failed: the
    # epoch restarts from last.pth.
    if session.cfg.distributed.world_size > 1:
        session.drop()  # the workers write last.pth: nothing in this process is current after them
        return launch_epoch(session.cfg, epoch)
    return session.train_epoch(epoch)


@task(name="final-checkpoint", cache_policy=NO_CACHE)
def final_checkpoint_task(session: TrainingSession) -> RunSummary:
    return session.finish()
