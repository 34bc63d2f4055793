"""A preempted deployment run resumes by itself (issue 18): prefect.yaml's trigger on nightly-train's
Crashed runs, on a real Prefect server with a process worker. A run killed with SIGKILL mid-epoch
(the failpoint, as a preempted machine) is followed by a run with resume_after_crash that continues
from last.pth in the same MLflow run to an uninterrupted run's metrics; a run that crashes every time
stops after max_crash_resumes automatic resumes, Failed with one line, and is not resumed again."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.sorting import FlowRunSort

from harv_train.config import load_config
from harv_train.core import checkpoints as ckpt
from tests.images import write_image_folder
from tests.servers import BIN, log_tail, prefect_env, prefect_server, stop, worker_scratch
from tests.trained import train_epochs

REPO = Path(__file__).resolve().parent.parent
POOL = "harv-train-pool"
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as api_url:
        env = prefect_env(home, api_url)
        for args in (["work-pool", "create", POOL, "--type", "process"], ["deploy", "--name", "nightly-train"]):
            result = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True,
                                    text=True, timeout=180)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield api_url, env


def _overrides(tmp_path: Path) -> dict:
    data = write_image_folder(tmp_path / "data", n_train=8, n_val=2)  # 4 batches an epoch
    return {
        "data_dir": str(data), "classes": None, "artifacts_dir": str(tmp_path / "artifacts"),
        "model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 32, "epochs": 3,
        "batch_size": 4, "num_workers": 0, "export": False, "threads": 1, "epoch_retries": 0,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow_experiment": "crash-resume",
        "registered_model_name": None,
    }


def _runs_until(api_url: str, env: dict, tmp_path: Path, first, done, worker_env: dict | None = None,
                timeout: float = 420):
    """Start a process worker, wait until `done(runs)` (the deployment's runs, oldest first), stop it."""
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=tmp_path,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2", **(worker_env or {}),
                 **worker_scratch(tmp_path / "worker-tmp")},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            with SyncPrefectClient(api_url) as client:
                while True:
                    runs = client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[first.deployment_id])),
                        sort=FlowRunSort.EXPECTED_START_TIME_ASC)
                    runs = [r for r in runs if r.created >= first.created]  # not an earlier test's
                    if done(runs):
                        return runs
                    assert time.monotonic() < deadline, (
                        f"runs: {[(r.name, r.state_type, r.state.message if r.state else None) for r in runs]}\n"
                        + log_tail(log_path, 40))
                    time.sleep(2)
        finally:
            stop(worker)
            shutil.rmtree(tmp_path / "worker-tmp", ignore_errors=True)


@pytest.mark.slow
def test_a_killed_deployment_run_is_resumed_by_a_new_run_to_the_uninterrupted_metrics(deployed, tmp_path):
    api_url, env = deployed
    overrides = _overrides(tmp_path)
    reference = [m.to_dict() for m in train_epochs(load_config(None, {
        **overrides, "artifacts_dir": str(tmp_path / "reference")}))]
    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name("train/nightly-train")
        first = client.create_flow_run_from_deployment(
            deployment.id, parameters={"params_file": None, "overrides": overrides},
            # SIGKILL at the 6th batch, in epoch 2, in this run only: its resume has the deployment's env.
            job_variables={"env": {"HARV_TRAIN_FAILPOINT": "train_batch:6"}})

    runs = _runs_until(api_url, env, tmp_path, first,
                       lambda runs: len(runs) == 2 and runs[1].state is not None and runs[1].state.is_final())
    crashed, resumed = runs
    assert crashed.id == first.id and crashed.state.is_crashed(), crashed.state
    assert resumed.state.is_completed(), (resumed.state.type, resumed.state.message)
    assert resumed.parameters["resume_after_crash"] == f"prefect.flow-run.{first.id}"

    final = ckpt.load_checkpoint(tmp_path / "artifacts" / "checkpoints" / ckpt.FINAL)
    for got, want in zip(final["history"], reference, strict=True):
        assert [got[k] for k in METRICS] == pytest.approx([want[k] for k in METRICS], rel=1e-5, abs=1e-6)
    mlflow = MlflowClient(overrides["mlflow_tracking_uri"])
    [mlflow_run] = mlflow.search_runs([mlflow.get_experiment_by_name("crash-resume").experiment_id])
    assert mlflow_run.info.run_id == final["mlflow_run_id"]  # the same MLflow run, continued
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["prefect.flow_run_id"] == str(resumed.id)
    assert [m.step for m in mlflow.get_metric_history(mlflow_run.info.run_id, "val_acc")] == [1, 2, 3]


@pytest.mark.slow
def test_a_run_that_crashes_every_time_stops_after_max_crash_resumes_and_says_so(deployed, tmp_path):
    api_url, env = deployed
    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name("train/nightly-train")
        first = client.create_flow_run_from_deployment(
            deployment.id, parameters={"params_file": None, "overrides": _overrides(tmp_path), "max_crash_resumes": 1})

    # Every run this worker starts is killed at its second batch.
    runs = _runs_until(api_url, env, tmp_path, first,
                       lambda runs: len(runs) >= 3 and runs[2].state is not None and runs[2].state.is_final(),
                       worker_env={"HARV_TRAIN_FAILPOINT": "train_batch:2"})
    time.sleep(5)  # room for a fourth run, which must not come
    with SyncPrefectClient(api_url) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    runs = [r for r in runs if r.created >= first.created]
    assert [r.state_type.value for r in runs] == ["CRASHED", "CRASHED", "FAILED"], [(r.name, r.state_type) for r in runs]
    assert "not resuming again" in runs[2].state.message and "max_crash_resumes 1" in runs[2].state.message
