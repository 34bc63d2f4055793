"""prefect.yaml on a real Prefect server: `prefect deploy --all` registers the deployments, a
process worker runs a triggered flow run of nightly-train to completion from this repository, and
a server with its scheduler on schedules nightly-train's runs from its cron.

The server, the CLI and the worker are subprocesses with their own PREFECT_HOME and PREFECT_API_URL;
this process reads the server with an explicit client, never through the settings the session's
test harness (`prefect_server` fixture) holds.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.server.schemas.schedules import CronSchedule

from harv_train.core import checkpoints as ckpt
from tests.images import write_image_folder
from tests.servers import BIN, log_tail, free_port, prefect_env, prefect_server, running_server, stop, worker_scratch

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
        _deploy_all(env)
        yield api_url, env


def _deploy_all(env: dict[str, str]) -> None:
    _cli(["work-pool", "create", POOL, "--type", "process"], env, timeout=120)
    _cli(["deploy", "--all"], env, timeout=180)


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


def test_triggered_runs_complete_on_a_process_worker_one_at_a_time_with_checkpoints_and_mlflow_runs(deployed, tmp_path):
    """Two runs of nightly-train on one artifacts_dir, a process worker free to start both: under
    prefect.yaml's concurrency_limit 1 the second waits (AwaitingConcurrencySlot) until the first has
    finished, then trains (without the limit it is refused the artifacts_dir lock and fails)."""
    api_url, env = deployed
    data = write_image_folder(tmp_path / "data", n_train=4, n_val=2)
    overrides = {
        "data_dir": str(data), "classes": None, "artifacts_dir": str(tmp_path / "artifacts"),
        "model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 32, "epochs": 1,
        "batch_size": 4, "num_workers": 0, "export": False,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow_experiment": "deployment-test",
        "registered_model_name": None,
    }
    mlflow = MlflowClient(overrides["mlflow_tracking_uri"])
    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name("train/nightly-train")
        runs = [client.create_flow_run_from_deployment(  # no base file: classes null stays
            deployment.id, parameters={"params_file": None, "overrides": overrides}) for _ in range(2)]

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "2"], cwd=tmp_path,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2", **worker_scratch(tmp_path / "worker-tmp")},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 420
            with SyncPrefectClient(api_url) as client:
                while not all(client.read_flow_run(r.id).state.is_final() for r in runs):
                    assert time.monotonic() < deadline, "runs not finished in 420 s:\n" + log_tail(worker_log, 40)
                    time.sleep(2)
                histories = {r.id: client.read_flow_run_states(r.id) for r in runs}
                finished = [client.read_flow_run(r.id) for r in runs]
        finally:
            stop(worker)
    assert all(r.state.is_completed() for r in finished), [(r.state.type, r.state.message) for r in finished]
    assert all({"harv-train", "nightly"} <= set(r.tags) for r in finished)  # prefect.yaml's tags

    def running_interval(states):
        return (min(s.timestamp for s in states if s.type == StateType.RUNNING),
                max(s.timestamp for s in states if s.type == StateType.COMPLETED))

    (_, first_end), (second_start, _) = sorted(running_interval(h) for h in histories.values())
    assert first_end <= second_start  # one at a time
    names = [[s.name for s in histories[r.id]] for r in runs]
    assert sum("AwaitingConcurrencySlot" in n for n in names) >= 1, names  # the second one waited
    for name in (ckpt.BEST, ckpt.FINAL, ckpt.LAST):
        assert (tmp_path / "artifacts" / "checkpoints" / name).is_file()
    assert len(list((tmp_path / "artifacts").glob("checkpoints-*"))) == 1  # the first run's, moved aside

    mlflow_runs = mlflow.search_runs([mlflow.get_experiment_by_name("deployment-test").experiment_id])
    assert sorted(r.data.tags["prefect.flow_run_id"] for r in mlflow_runs) == sorted(str(r.id) for r in runs)
    for mlflow_run in mlflow_runs:
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.data.tags["prefect.deployment"] == "nightly-train"
        assert mlflow_run.data.params["epochs"] == "1"
    assert (tmp_path / "mlruns" / "deployment-test").is_dir()  # beside the store, not in the repository


def test_scheduler_creates_the_nightly_runs_from_its_cron(tmp_path):
    """The server's scheduler turns nightly-train's cron into Scheduled runs on the next nights at
    02:00 Berlin time (it cannot with SQLAlchemy 2.1: every scheduler loop then fails with
    "Can't evaluate bulk DML statement"). Its own server: the shared one runs no scheduler, so that
    no scheduled run reaches the other test's worker."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home, api_url)
    server_env = {**env, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}  # default: 60
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    with running_server(f"prefect server on port {port}", cmd, f"{api_url}/health", home / "server.log",
                        env=server_env):
        deployed_at = datetime.now(timezone.utc)
        _deploy_all(env)
        with SyncPrefectClient(api_url) as client:
            nightly = client.read_deployment_by_name("train/nightly-train")
            smoke = client.read_deployment_by_name("train/smoke-train")

            def scheduled_runs(deployment_id):
                return client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))

            deadline = time.monotonic() + 30  # ~30 scheduler loops
            while not (runs := scheduled_runs(nightly.id)):
                assert time.monotonic() < deadline, (
                    "the scheduler made no Scheduled run of nightly-train within 30 s; server log:\n"
                    + log_tail(home / "server.log", 30))
                time.sleep(0.5)
            seen_at = datetime.now(timezone.utc)
            smoke_runs = scheduled_runs(smoke.id)

    assert all("auto-scheduled" in run.tags for run in runs)
    starts = sorted(run.expected_start_time for run in runs)
    assert deployed_at < starts[0], (deployed_at, starts)
    # The next nights at 02:00 in Europe/Berlin ("0 2 * * *", DST as Prefect reads it) from the
    # moment the scheduler ran: after deploying, before the runs were seen.
    [schedule] = nightly.schedules
    cron = CronSchedule(cron=schedule.schedule.cron, timezone=schedule.schedule.timezone)
    expected = [asyncio.run(cron.get_dates(n=len(starts), start=t)) for t in (deployed_at, seen_at)]
    assert starts in expected, (starts, expected)
    assert all(t.astimezone(ZoneInfo("Europe/Berlin")).strftime("%M:%S") == "00:00" for t in starts), starts
    assert smoke_runs == []  # its schedule is inactive
