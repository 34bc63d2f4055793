"""Faults: kill -9 at any moment, resume, tracking outages, locks, disk, and the same seed twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import lock_held_elsewhere
from flows.train_flow import train_flow
from harv_train.core import checkpoints as ckpt
from harv_train.config import write_params_file
from harv_train.errors import UserError
from harv_train.core.locking import artifacts_lock
from harv_train.core.checks import check_free_space, estimated_checkpoint_bytes
from tests.servers import free_port
from tests.trained import train_epochs

REPO = Path(__file__).resolve().parent.parent
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")

pytestmark = pytest.mark.usefixtures("prefect_server")


def _cli(params: Path, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """The real command in its own process, against the tests' Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("HARV_TRAIN_FAILPOINT", None)
    if failpoint:
        env["HARV_TRAIN_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "flows/train_flow.py", "--params", str(params), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


_REFERENCES: dict[tuple, list[dict]] = {}


def _reference_history(cfg):
    """An uninterrupted run's epochs; the same for every test on the tiny dataset (seeded, same
    pixels), so computed once per set of params that change its numbers."""
    key = tuple(sorted((k, str(v)) for k, v in cfg.to_dict().items()
                       if k not in ("artifacts_dir", "data_dir", "mlflow_tracking_uri", "epoch_retries")))
    if key not in _REFERENCES:
        _REFERENCES[key] = [m.to_dict() for m in train_epochs(cfg)]
    return _REFERENCES[key]


@pytest.mark.parametrize(
    "failpoint",
    ["train_batch:6", "checkpoint_partial:3",
     # slow (make test-slow): the same rename window as a partial write, and the same MLflow request a
     # kill inside one hits in tests/test_mlflow_server.py
     pytest.param("checkpoint_write:3", marks=pytest.mark.slow),
     pytest.param("mlflow_log:6", marks=pytest.mark.slow)],
    ids=["during-an-epoch", "inside-a-checkpoint-write", "after-a-checkpoint-write-before-its-rename",
         "during-mlflow-logging"],
)
def test_kill_9_then_resume_equals_an_uninterrupted_run(make_config, tmp_path, failpoint):
    reference = _reference_history(make_config(epochs=3, artifacts_dir=str(tmp_path / "reference")))
    cfg = make_config(epochs=3)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)

    killed = _cli(params, failpoint=failpoint)
    assert killed.returncode == -9, killed.stderr[-2000:]
    for path in cfg.checkpoints_dir.glob("*.pth"):
        ckpt.load_checkpoint(path)  # every checkpoint on disk still loads
    last = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
    if failpoint.startswith("checkpoint_"):  # the kill hit the 3rd write: epoch 1's last.pth
        [tmp] = cfg.checkpoints_dir.glob(".last.pth.*.tmp")
        assert last["epoch"] == 0 and tmp.stat().st_size > 0
        if failpoint.startswith("checkpoint_partial"):  # part of a checkpoint, which no load accepts
            assert tmp.stat().st_size < (cfg.checkpoints_dir / ckpt.BEST).stat().st_size
            with pytest.raises(Exception):
                torch.load(tmp, weights_only=True)
    run_id = last["mlflow_run_id"]

    resumed = _cli(params, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)
    assert final["epoch"] == 3 and final["mlflow_run_id"] == run_id
    for got, want in zip(final["history"], reference, strict=True):
        assert [got[k] for k in METRICS] == pytest.approx([want[k] for k in METRICS], rel=1e-5, abs=1e-6)
    assert not list(cfg.checkpoints_dir.glob(".*.tmp"))
    client = MlflowClient(cfg.mlflow_tracking_uri)
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_io_error_in_an_epoch_is_retried_from_the_checkpoint(make_config, tmp_path):
    cfg = make_config(epochs=2, epoch_retries=2)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    result = _cli(params, failpoint="train_batch:6:raise")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "simulated I/O error" in result.stdout + result.stderr
    reference = _reference_history(make_config(epochs=2, artifacts_dir=str(tmp_path / "reference")))
    final = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)
    assert [m["val_loss"] for m in final["history"]] == pytest.approx([m["val_loss"] for m in reference], rel=1e-5)


def test_mlflow_unreachable_training_goes_on_and_the_run_fails_visibly(make_config, tmp_path):
    cfg = make_config(epochs=2, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    state = train_flow(params_file=str(params), return_state=True)
    assert state.is_failed()
    assert "training finished and checkpoints are in" in state.message
    assert "MLflow logging failed" in state.message and "--resume" in state.message
    final = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)
    assert final["epoch"] == 2 and (cfg.checkpoints_dir / ckpt.BEST).is_file()


def test_a_tracking_blip_mid_run_is_caught_up_at_the_end(make_config, tmp_path):
    cfg = make_config(epochs=3)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    # The 5th MLflow call (epoch 1's metrics, after opening the run, its params, the dataset size and
    # the dataset input) fails once: later calls wait for the end of the run.
    result = _cli(params, failpoint="mlflow_log:5:raise")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failed while logging epoch 1" in result.stdout + result.stderr
    assert "everything missed was logged at the end" in result.stdout + result.stderr
    run_id = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["mlflow_run_id"]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2, 3]


def test_a_tracking_blip_on_the_dataset_size_is_logged_at_the_end(make_config, tmp_path):
    cfg = make_config(epochs=1)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    result = _cli(params, failpoint="mlflow_log:3:raise")  # 1 opens the run, 2 logs params, 3 the dataset size
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failed while logging dataset size" in result.stdout + result.stderr
    run_id = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["mlflow_run_id"]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert (metrics.get("train_images"), metrics.get("val_images"), metrics.get("skipped_images")) == (16, 8, 0)
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1]


def test_a_run_opened_late_after_an_outage_at_the_start_is_the_one_resume_continues(make_config, tmp_path):
    """MLflow down when the run starts, back by its end: the run is opened then, and its id must reach
    the checkpoints, or a later --resume opens a second run (it did: last.pth held no run id)."""
    cfg = make_config(epochs=1)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    first = _cli(params, failpoint="mlflow_log:1:raise")  # opening the run fails
    assert first.returncode == 0, first.stderr[-2000:]
    assert "failed while starting the run" in first.stdout + first.stderr
    run_id = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["mlflow_run_id"]
    assert run_id, "the run opened at the end left no id in final_model.pth"
    for name in (ckpt.LAST, ckpt.BEST):
        assert ckpt.load_checkpoint(cfg.checkpoints_dir / name)["mlflow_run_id"] == run_id
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert client.get_run(run_id).data.metrics["train_images"] == 16, "the run opened late has the dataset size"

    resumed = _cli(params, "--resume", "--set", "epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [experiment] = [e for e in client.search_experiments() if e.name == cfg.mlflow_experiment]
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tracking_down_until_the_end_fails_the_run_and_resume_catches_up(make_config, tmp_path):
    cfg = make_config(epochs=3)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    failed = _cli(params, failpoint="mlflow_log:5+:raise")  # from epoch 1's metrics on
    assert failed.returncode == 1
    assert "MLflow logging failed" in failed.stderr and "rerun with --resume" in failed.stderr
    run_id = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["mlflow_run_id"]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert client.get_metric_history(run_id, "val_acc") == []

    caught_up = _cli(params, "--resume")
    assert caught_up.returncode == 0, caught_up.stderr[-2000:]
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_after_a_kill_between_logging_the_model_and_registering_it_logs_and_registers_once(
        make_config, tmp_path):
    cfg = make_config(epochs=1, registered_model_name="killed-before-registering")
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    # MLflow calls: open the run, params, dataset size, dataset input, epoch 1; at the end params,
    # dataset size, dataset input, epochs, summary, three files, two split lists, the model, then 17:
    # registering it.
    killed = _cli(params, failpoint="mlflow_log:17")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "Logged the best model to MLflow" in killed.stdout + killed.stderr
    assert "Registered" not in killed.stdout + killed.stderr

    resumed = _cli(params, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run_id = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["mlflow_run_id"]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(run_id)
    assert len(client.search_logged_models(experiment_ids=[run.info.experiment_id])) == 1
    [version] = client.search_model_versions("name = 'killed-before-registering'")
    assert (str(version.version), version.run_id) == ("1", run_id)
    assert str(client.get_model_version_by_alias("killed-before-registering", "champion").version) == "1"
    for key in run.data.metrics:  # system/* are sampled every 10 s: a slow run has several
        if not key.startswith("system/"):
            assert len(client.get_metric_history(run_id, key)) == 1, key
    assert run.info.status == "FINISHED"


def test_a_second_flow_run_on_the_same_artifacts_dir_refuses(make_config, tmp_path):
    cfg = make_config()
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    with lock_held_elsewhere(cfg.artifacts_dir):
        state = train_flow(params_file=str(params), return_state=True)
        assert state.is_failed() and "is in use by a running training" in state.message
        assert not cfg.checkpoints_dir.exists()


def test_the_lock_is_released_when_its_holder_is_killed(make_config):
    cfg = make_config()
    with lock_held_elsewhere(cfg.artifacts_dir) as holder:
        holder.kill()
        holder.wait()
        with artifacts_lock(cfg.artifacts_dir):
            pass


def test_artifacts_dir_that_cannot_be_created_is_a_clear_error(make_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create artifacts_dir .*choose a writable artifacts_dir"):
        with artifacts_lock(blocker / "artifacts"):
            pass


def test_not_enough_disk_space_stops_before_training(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError, match="not enough free disk space .*MiB free, checkpoints need about"):
        check_free_space(tmp_path, free + 2**40)
    check_free_space(tmp_path, 2**20)


def test_checkpoint_size_estimate_covers_a_real_checkpoint(make_config):
    cfg = make_config(epochs=1)
    _reference_history(cfg)
    size = (cfg.checkpoints_dir / ckpt.LAST).stat().st_size
    estimate = estimated_checkpoint_bytes(cfg, 2)
    assert 0.9 * size <= estimate <= 1.5 * size
