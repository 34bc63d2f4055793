"""prefect.yaml on a real Prefect server: `prefect deploy --all` registers the deployments, and a
process worker runs a triggered flow run of nightly-train to completion from this repository.

The server, the CLI and the worker are subprocesses with their own PREFECT_HOME and PREFECT_API_URL;
this process reads the server with an explicit client, never through the settings the session's
test harness (`prefect_server` fixture) holds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import SyncPrefectClient

from tasks import checkpoints as ckpt
from tests.images import write_image_folder
from tests.servers import BIN, prefect_env, prefect_server

REPO = Path(__file__).resolve().parent.parent
POOL = "harv-train-pool"


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A Prefect server with the work pool and every deployment of prefect.yaml; yields (api_url, env)."""
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as api_url:
        env = prefect_env(home, api_url)
        _cli(["work-pool", "create", POOL, "--type", "process"], env, timeout=120)
        _cli(["deploy", "--all"], env, timeout=180)
        yield api_url, env


def test_deploy_registers_nightly_schedule_parameters_and_pool(deployed):
    api_url, _ = deployed
    with SyncPrefectClient(api_url) as client:
        nightly = client.read_deployment_by_name("train/nightly-train")
        smoke = client.read_deployment_by_name("train/smoke-train")
        pool = client.read_work_pool(POOL)

    assert pool.type == "process"
    assert nightly.work_pool_name == POOL and nightly.entrypoint == "flows/train_flow.py:train_flow"
    [schedule] = nightly.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert nightly.parameters == {"params_file": "params.yaml", "overrides": {"epochs": 10}}
    assert nightly.global_concurrency_limit.limit == 1
    # Runs start in this repository, so params.yaml and relative paths resolve as on the command line.
    assert nightly.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert [s.active for s in smoke.schedules] == [False]  # the smoke run only runs when asked


def test_triggered_run_completes_on_a_process_worker_with_checkpoints_and_mlflow_run(deployed, tmp_path):
    api_url, env = deployed
    data = write_image_folder(tmp_path / "data")
    overrides = {
        "data_dir": str(data), "classes": None, "artifacts_dir": str(tmp_path / "artifacts"),
        "model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 32, "epochs": 1,
        "batch_size": 4, "num_workers": 0,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow_experiment": "deployment-test",
        "registered_model_name": None,
    }
    # The run's working directory is the repository: keep the MLflow artifacts of this store in tmp.
    mlflow = MlflowClient(overrides["mlflow_tracking_uri"])
    mlflow.create_experiment("deployment-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name("train/nightly-train")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})

    # One poll of the pool: the worker submits the run, waits for it to finish, then exits.
    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once", "--limit", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = f"worker exited {worker.returncode}:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"

    with SyncPrefectClient(api_url) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state.type}: {state.message}\n{log}"
    for name in (ckpt.BEST, ckpt.FINAL, ckpt.LAST):
        assert (tmp_path / "artifacts" / "checkpoints" / name).is_file(), log

    [mlflow_run] = mlflow.search_runs([mlflow.get_experiment_by_name("deployment-test").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["prefect.flow_run_id"] == str(run.id)
    assert mlflow_run.data.tags["prefect.deployment"] == "nightly-train"
    assert mlflow_run.data.params["epochs"] == "1"
    assert (tmp_path / "mlartifacts").is_dir()
