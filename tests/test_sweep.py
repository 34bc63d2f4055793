"""Hyper-parameter sweeps (flows/sweep_flow.py, harv_train/sweep/): the space's one-line errors, a
trial pruned by the median pruner, a sweep killed with kill -9 and resumed to one MLflow parent with
its child runs, best params.yaml, plots and champion, and trials on two real process workers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from prefect import flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.states import Running, Scheduled

from harv_train.config import load_config
from harv_train.core import checkpoints as ckpt
from harv_train.errors import ConfigError
from harv_train.sweep import study as studies
from harv_train.sweep import watch
from harv_train.sweep.space import parse_space
from tests.images import write_image_folder
from tests.servers import (BIN, free_port, log_tail, mlflow_server, postgres_binaries, postgres_server,
                           prefect_env, prefect_server, stop, worker_scratch)

REPO = Path(__file__).resolve().parent.parent
POOL = "sweep-pool"
SPACE = {"lr": {"low": 1.0e-4, "high": 1.0e-1, "log": True}, "freeze_ratio": {"low": 0.0, "high": 1.0}}


def _params(tmp: Path, **values) -> Path:
    data = tmp / "data"
    if not data.is_dir():
        write_image_folder(data, n_train=4, n_val=2, size=32)
    base = {"model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 32, "epochs": 2,
            "batch_size": 4, "num_workers": 0, "export": False, "data_dir": str(data),
            "artifacts_dir": str(tmp / "sweep"), "mlflow_tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "mlflow_experiment": "sweep-test", "registered_model_name": "sweep-model", **values}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(base), encoding="utf-8")
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE), encoding="utf-8")
    return path


def _sweep_cmd(tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "flows/sweep_flow.py", "--params", str(tmp / "params.yaml"),
            "--space", str(tmp / "space.yaml"), *args]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
            **extra}


@pytest.mark.parametrize("space, says", [
    ({"lrr": {"low": 0.1, "high": 0.2}}, "'lrr' is not a param"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "low must be below high"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "a log range needs low > 0"),
    ({"freeze_ratio": {"low": 0.5, "high": 1.5}}, "freeze_ratio must be a number from 0 to 1, got 1.5"),
    ({"batch_size": {"choices": []}}, "choices must be a non-empty list"),
    ({"artifacts_dir": {"choices": ["a", "b"]}}, "artifacts_dir cannot be swept"),
])
def test_space_with_an_unknown_param_or_bad_range_is_a_one_line_error(space, says):
    with pytest.raises(ConfigError) as caught:
        parse_space(space, load_config(None, {}), "space.yaml")
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_sweep_command_line_refuses_a_bad_space_in_one_line_before_any_run(tmp_path):
    _params(tmp_path)
    (tmp_path / "space.yaml").write_text("lr: {low: 0.1, high: 0.01}\n")
    result = subprocess.run(_sweep_cmd(tmp_path, "--trials", "2"), cwd=REPO, capture_output=True, text=True,
                            env=_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: space file {tmp_path / 'space.yaml'}: lr: low must be below high, got low=0.1, high=0.01: "
        "swap or widen them"]
    assert not (tmp_path / "sweep").exists()


def test_trial_below_the_median_is_pruned_after_its_epoch_in_optuna_mlflow_and_prefect_keeping_checkpoints(
        prefect_server, tmp_path):
    from flows.train_flow import train_flow
    from harv_train.sweep.trial import SweepTrial

    cfg = load_config(_params(tmp_path, epochs=3, artifacts_dir=str(tmp_path / "trial"),
                              registered_model_name=None))
    storage = studies.default_storage(tmp_path)
    study = studies.open_study(storage, "s", seed=0, resume=False)
    for _ in range(studies.PRUNER_STARTUP_TRIALS):  # earlier trials at an accuracy no run reaches
        study.add_trial(optuna.trial.create_trial(value=2.0, intermediate_values={1: 2.0, 2: 2.0, 3: 2.0}))
    number = study.ask().number

    state = train_flow(params_file=None, overrides=cfg.to_dict(), sweep_trial=SweepTrial(
        storage=storage, study_name="s", trial_number=number), run_tags={"sweep.trial": str(number)},
        return_state=True)

    assert state.is_completed() and state.name == "Pruned", (state.name, state.message)
    assert studies.finish_trial(study, number, succeeded=True) == TrialState.PRUNED
    assert study.trials[number].intermediate_values == {1: pytest.approx(state.result().history[0].val_acc)}
    assert ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)["epoch"] == 1  # stopped after epoch 1 of 3
    assert (cfg.checkpoints_dir / ckpt.BEST).is_file() and (cfg.checkpoints_dir / ckpt.FINAL).is_file()
    client = MlflowClient(cfg.mlflow_tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.tags["sweep.pruned"], run.data.tags["sweep.pruned_at_epoch"]) == ("true", "1")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]


def test_sweep_plots_are_written_without_optuna_warnings_even_when_trials_score_alike(tmp_path):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) * 0 + 1.0, n_trials=3)  # all 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's console stays clean: any warning fails the test
        written = studies.write_plots(study, tmp_path / "plots")
    assert set(written) == {"optimization_history", "param_importances", "slice"}
    assert all(path.stat().st_size > 0 for path in written.values())


def _wait_for_first_epoch(tmp: Path, number: int, sweep: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until trial `number` has checkpointed its first epoch, while the sweep runs."""
    last = tmp / "sweep" / "trials" / f"trial-{number:03d}" / "checkpoints" / ckpt.LAST
    deadline = time.monotonic() + timeout_s
    while not (last.is_file() and ckpt.load_checkpoint(last)["epoch"] >= 1):
        assert sweep.poll() is None, "the sweep ended before the kill:\n" + log_tail(log, 30)
        assert time.monotonic() < deadline, f"trial {number} wrote no epoch in {timeout_s} s:\n" + log_tail(log, 30)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """A 2-trial sweep (2 epochs each; the data has a test split) killed with kill -9 once trial 1 has
    checkpointed its first epoch, then run again with --resume. Its study lives in PostgreSQL (the
    distribution's server, on loopback), as a team's would; in SQLite where PostgreSQL is not installed.
    Yields (tmp, resume's completed process, the storage URL)."""
    tmp = tmp_path_factory.mktemp("sweep")
    _params(tmp)
    shutil.copytree(tmp / "data" / "val", tmp / "data" / "test")  # evaluated after training, chooses nothing
    env = _env(HARV_TRAIN_CACHE_DIR=str(tmp / "cache"))
    with contextlib.ExitStack() as servers:
        storage = studies.default_storage(tmp / "sweep")
        if postgres_binaries():  # with a password in the URL: it must not reach MLflow or the log (trust ignores it)
            storage = servers.enter_context(postgres_server()).replace("postgres@", "postgres:not-shown@")
        log = tmp / "first.log"
        with open(log, "wb") as out:
            first = subprocess.Popen(_sweep_cmd(tmp, "--trials", "2", "--storage", storage), cwd=REPO, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_first_epoch(tmp, 1, first, log, 480)
            os.killpg(first.pid, signal.SIGKILL)  # the sweep, its Prefect server, everything
        finally:
            stop(first)
        resumed = subprocess.run(_sweep_cmd(tmp, "--trials", "2", "--resume", "--storage", storage), cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        yield tmp, resumed, storage


def test_sweep_killed_with_kill_9_resumes_to_the_same_trials_none_counted_twice(resumed_sweep):
    tmp, resumed, storage = resumed_sweep
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert "trial 1 was cut short: resuming it" in resumed.stdout + resumed.stderr
    assert "trial 0 was cut short" not in resumed.stdout + resumed.stderr  # finished: kept, not run again
    # Trial 1 continued from its checkpoint: each epoch trained and reported once, in one MLflow run.
    assert study.trials[1].intermediate_values.keys() == {1, 2}
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["sweep.trial"] for r in children) == ["0", "1"]
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")] == [1, 2]


def test_sweep_has_one_mlflow_parent_with_its_trials_as_children_best_params_plots_and_a_champion(resumed_sweep):
    tmp, resumed, storage = resumed_sweep
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r is not parent]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert parent.data.params["sweep.storage"] == studies.shown_storage(storage)  # no password in MLflow ...
    assert ":not-shown@" not in resumed.stdout + resumed.stderr + parent.data.params["sweep.storage"]  # ... or the log
    best = study.best_trial
    assert parent.data.metrics["best_val_acc"] == best.value and parent.data.metrics["best_trial"] == best.number
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for folder in ("plots", "best") for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"space.yaml", "trials.csv", "best/params.yaml", "plots/optimization_history.png",
            "plots/slice.png"} <= artifacts
    # The best params.yaml trains: it is the base with the best trial's values.
    best_cfg = load_config(client.download_artifacts(parent.info.run_id, "best/params.yaml", str(tmp)))
    assert {k: getattr(best_cfg, k) for k in best.params} == best.params
    assert best_cfg.registered_model_name == "sweep-model" and best_cfg.data_dir == str(tmp / "data")
    # The winner is the champion, registered from its own child run.
    champion = client.get_model_version_by_alias("sweep-model", "champion")
    [winner] = [r for r in children if r.data.tags["sweep.trial"] == str(best.number)]
    assert champion.run_id == winner.info.run_id
    # The parent reports the winner's test metrics, under the names the training run logs them.
    test = {k: v for k, v in winner.data.metrics.items() if k.startswith("test_")}
    assert "test_accuracy" in test and "test_loss" in test
    assert {k: parent.data.metrics.get(k) for k in test} == test


@pytest.mark.slow
def test_mlflow_down_through_a_sweep_trials_go_on_and_resume_logs_them_under_one_parent(tmp_path):
    """MLflow unreachable for the whole sweep: both trials train and count (COMPLETE, not FAIL), the
    sweep ends Failed saying what to do; once an MLflow server answers there, --resume logs each trial
    as a child of one parent run and registers the winner."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    _params(tmp_path, epochs=1, mlflow_tracking_uri=uri)
    env = _env(HARV_TRAIN_CACHE_DIR=str(tmp_path / "cache"), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
    down = subprocess.run(_sweep_cmd(tmp_path, "--trials", "2"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=420)
    assert down.returncode == 1, down.stdout[-3000:] + down.stderr[-3000:]
    assert (f"but MLflow logging failed (trials 0, 1 and the parent run): rerun with --resume once {uri} is "
            "reachable") in down.stderr.strip().splitlines()[-1]
    study = optuna.load_study(study_name="sweep", storage=studies.default_storage(tmp_path / "sweep"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert (tmp_path / "sweep" / "best" / "params.yaml").is_file()
    values = [t.intermediate_values for t in study.trials]

    with mlflow_server(tmp_path / "mlflow", port=port):
        resumed = subprocess.run(_sweep_cmd(tmp_path, "--trials", "2", "--resume"), cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=420)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
        [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if r is not parent]
        assert sorted((r.data.tags["sweep.trial"], r.data.tags["mlflow.parentRunId"]) for r in children) == [
            ("0", parent.info.run_id), ("1", parent.info.run_id)]
        for child in children:
            assert child.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")] == [1]
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 2
        champion = client.get_model_version_by_alias("sweep-model", "champion")
        assert champion.run_id in {r.info.run_id for r in children}
    study = optuna.load_study(study_name="sweep", storage=studies.default_storage(tmp_path / "sweep"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2 and studies.unlogged(study) == []
    assert [t.intermediate_values for t in study.trials] == values  # counted once, as they were


@flow(name="sweep-watch-probe")
def _probe_flow():
    """A flow whose runs the tests create and move by hand, standing for a trial run on a worker."""


def test_a_trial_run_silent_past_the_heartbeat_timeout_is_set_crashed_so_the_sweep_runs_it_again(prefect_server):
    # A worker killed together with its trial run leaves the run Running on the server, for good.
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(_probe_flow, state=Running())
        state = watch.wait_for_run(client, run.id, POOL, timeout=2, label="trial 0", poll=0.2)
        assert state.is_crashed()
        assert state.message.startswith("no heartbeat or state change for 2 s while Running: its worker")
        assert client.read_flow_run(run.id).state.is_crashed()  # on the server too: the UI shows it Crashed


def test_a_trial_run_no_worker_takes_while_none_is_online_is_cancelled_and_ends_the_sweep_in_one_line(
        prefect_server):
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="empty-pool", type="process"))
        run = client.create_flow_run(_probe_flow, state=Scheduled())
        with pytest.raises(watch.NoWorkerError) as caught:
            watch.wait_for_run(client, run.id, "empty-pool", timeout=2, label="trial 3", poll=0.2)
        assert str(caught.value) == ("trial 3: no worker of work pool 'empty-pool' was online for 2 s: start one "
                                     "(prefect worker start --pool empty-pool), then rerun the sweep with --resume")
        assert client.read_flow_run(run.id).state.is_cancelled()  # a worker started later must not train it


def _worker(env: dict[str, str], tmp: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1", "--name", name],
                            cwd=tmp, env={**env, **worker_scratch(tmp / "worker-tmp")}, start_new_session=True,
                            stdout=open(tmp / f"{name}.log", "wb"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_trial_whose_worker_dies_with_it_is_set_crashed_and_resumed_from_its_checkpoint_counted_once(tmp_path):
    """A real Prefect server and a process worker. Once trial 0 has checkpointed epoch 1, the worker and
    the run it started are killed with SIGKILL, as when their machine is lost: nothing is left to tell
    the server, and the run stays Running there. The sweep sees its heartbeats stop, sets it Crashed,
    and a second worker resumes the trial from last.pth: one COMPLETE trial, each epoch once."""
    _params(tmp_path, epochs=3)
    home = tmp_path / "prefect-home"
    with prefect_server(home) as api_url:
        env = {**prefect_env(home, api_url), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
               "HARV_TRAIN_CACHE_DIR": str(tmp_path / "cache"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        log = tmp_path / "sweep.log"
        procs = [_worker(env, tmp_path, "worker-1")]
        with open(log, "wb") as out:
            sweep = subprocess.Popen(_sweep_cmd(tmp_path, "--trials", "1", "--workers", f"pool:{POOL}",
                                                "--heartbeat-timeout", "60"),
                                     cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_first_epoch(tmp_path, 0, sweep, log, 300)
            # The worker and its run (a session of its own): both stopped first, so neither sees the other die.
            machine = [procs[0].pid] + [p.pid for p in psutil.Process(procs[0].pid).children(recursive=True)]
            for pid in machine:
                os.kill(pid, signal.SIGSTOP)
            for pid in machine:
                os.kill(pid, signal.SIGKILL)
            procs.append(_worker(env, tmp_path, "worker-2"))
            sweep.wait(timeout=420)
        finally:
            for proc in (sweep, *procs):
                stop(proc)
            shutil.rmtree(tmp_path / "worker-tmp", ignore_errors=True)
        assert sweep.returncode == 0, log_tail(log, 40) + log_tail(tmp_path / "worker-2.log", 20)
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(api_url) as client:
            runs = sorted((r for r in client.read_flow_runs() if r.name == "trial-000"), key=lambda r: r.created)
            beats = [watch.heartbeats(client, r.id) for r in runs]
    assert [r.state_type.value for r in runs] == ["CRASHED", "COMPLETED"], [(r.state_name, r.state.message) for r in runs]
    assert runs[0].state.message.startswith("no heartbeat or state change for 60 s while Running")
    assert [r.parameters["resume"] for r in runs] == [False, True]  # the second continued from last.pth
    assert beats[1] >= 1  # the trial runs send heartbeats (their job environment sets how often)
    study = optuna.load_study(study_name="sweep", storage=studies.default_storage(tmp_path / "sweep"))
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.COMPLETE)]
    assert study.trials[0].intermediate_values.keys() == {1, 2, 3}
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("sweep-test").experiment_id])
    [child] = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [m.step for m in mlflow.get_metric_history(child.info.run_id, "val_acc")] == [1, 2, 3]


@pytest.mark.slow
def test_trials_run_as_deployment_runs_on_two_process_workers_none_twice(tmp_path):
    """A real Prefect server, a process work pool with two workers (one run each at a time) and
    `--workers pool:NAME --parallel 2`: both workers train a trial, and each trial runs once."""
    _params(tmp_path, epochs=1)
    home = tmp_path / "prefect-home"
    with prefect_server(home) as api_url:
        env = {**prefect_env(home, api_url), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
               "HARV_TRAIN_CACHE_DIR": str(tmp_path / "cache"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        workers = [_worker(env, tmp_path, f"worker-{i}") for i in (1, 2)]
        try:
            result = subprocess.run(_sweep_cmd(tmp_path, "--trials", "2", "--workers", f"pool:{POOL}",
                                               "--parallel", "2"),
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        finally:
            for worker in workers:
                stop(worker)
            shutil.rmtree(tmp_path / "worker-tmp", ignore_errors=True)
        assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-2000:]
                                        + log_tail(tmp_path / "worker-1.log", 20))
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with SyncPrefectClient(api_url) as client:
            trial_runs = [r for r in client.read_flow_runs() if r.name.startswith("trial-")]
            logs = [log.message for log in client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in trial_runs])))]
    assert sorted(r.name for r in trial_runs) == ["trial-000", "trial-001"]  # none twice
    assert all(r.state.is_completed() for r in trial_runs)
    # Each run starts in the repository (a set_working_directory step), as prefect.yaml's deployments
    # do, instead of a copy of it (.venv included) in the worker's temporary folder.
    assert logs.count("Running 1 deployment pull step(s)") == 2, logs[:10]
    assert not [m for m in logs if m.startswith("Downloading flow code")]
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("sweep-test").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["prefect.worker"] for r in children) == ["worker-1", "worker-2"]
    study = optuna.load_study(study_name="sweep", storage=studies.default_storage(tmp_path / "sweep"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
