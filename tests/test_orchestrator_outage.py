"""A Prefect API outage mid-run (issue 18): a real `prefect server start` on loopback, stopped after
the first epoch and started again on the same port and database while the run goes on. Training,
evaluation, export and MLflow complete; the run says once that the API went and once that it came
back, prints no traceback, and its final state reaches the server that came back."""

from __future__ import annotations

import pytest

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import SyncPrefectClient

from harv_train.config import load_config, write_params_file
from harv_train.core import checkpoints as ckpt
from tests.images import write_image_folder
from tests.servers import free_port, log_tail, prefect_env, prefect_server

REPO = Path(__file__).resolve().parent.parent
GONE = "is unreachable"
BACK = "is reachable again"


def _wait_for(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}:\n{log_tail(log, 40)}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{log_tail(log, 40)}"
        time.sleep(0.2)


def _epochs_done(cfg) -> int:
    last = cfg.checkpoints_dir / ckpt.LAST
    with contextlib.suppress(Exception):  # absent, or being replaced
        return ckpt.load_checkpoint(last)["epoch"]
    return -1


def test_a_prefect_server_stopped_and_restarted_mid_run_leaves_a_finished_training_export_and_mlflow_run(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=30, n_val=4)
    cfg = load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 32, "epochs": 3, "batch_size": 4,
        "classes": None, "data_dir": str(data), "artifacts_dir": str(tmp_path / "artifacts"), "num_workers": 0,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow_experiment": "outage",
        "export": True, "threads": 1,
        "prefect_outage_wait_s": 180,  # the restart below lands inside it, however slow the machine
    })
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    home, port, log = tmp_path / "prefect-home", free_port(), tmp_path / "run.log"

    with contextlib.ExitStack() as first_server:
        api_url = first_server.enter_context(prefect_server(home, port))
        with open(log, "w") as out:
            run = subprocess.Popen([sys.executable, "flows/train_flow.py", "--params", str(params)], cwd=REPO,
                                   env=prefect_env(home, api_url), stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _epochs_done(cfg) >= 1, "a first epoch", run, log)
            first_server.close()  # the API goes away mid-run
            _wait_for(lambda: GONE in log.read_text(), "word of the outage", run, log)
            with prefect_server(home, port):  # the same database, back on the same port
                code = run.wait(timeout=300)
                output = log.read_text()
                with SyncPrefectClient(api_url) as client:
                    [flow_run] = client.read_flow_runs()
                    artifact_keys = {a.key for a in client.read_artifacts()}
        finally:
            run.kill()
            run.wait()

    assert code == 0, output[-3000:]
    assert output.count(GONE) == 1 and output.count(BACK) == 1, output[-3000:]
    assert "Traceback" not in output and "Error logging to API" not in output, output[-3000:]
    # Nothing else about the outage: not Prefect's own repeats (its events client's reconnect warnings,
    # its services' errors). The export's plots may warn about fonts; that is not the outage.
    others = [line for line in output.splitlines() if ("| WARNING" in line or "| ERROR" in line)
              and not any(ours in line for ours in (GONE, BACK, "waiting up to", "matplotlib"))]
    assert others == [], others
    # The final state reached the server that came back, saying what happened.
    assert flow_run.state.is_completed(), (flow_run.state.type, flow_run.state.message)
    assert "was unreachable for" in flow_run.state.message
    assert {"training-summary", "evaluation-report", "model-export"} <= artifact_keys  # published after the outage
    # Training, evaluation and export went on through the outage.
    assert _epochs_done(cfg) == 3
    assert (cfg.eval_dir / "report.json").is_file()
    assert (cfg.export_dir / "model.onnx").is_file()
    mlflow = MlflowClient(cfg.mlflow_tracking_uri)
    [mlflow_run] = mlflow.search_runs([mlflow.get_experiment_by_name("outage").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert "was unreachable for" in mlflow_run.data.tags["harv_train.orchestrator_unreachable"]
    assert [m.step for m in mlflow.get_metric_history(mlflow_run.info.run_id, "val_acc")] == [1, 2, 3]


@pytest.mark.slow
def test_a_prefect_server_gone_until_the_end_leaves_a_finished_training_and_exit_code_3(tmp_path):
    """Never back: the run still trains, evaluates and finishes its MLflow run, then says in its last
    line that Prefect never heard the end (exit 3), without waiting out Prefect's queues."""
    data = write_image_folder(tmp_path / "data", n_train=30, n_val=4)
    cfg = load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 32, "epochs": 2, "batch_size": 4,
        "classes": None, "data_dir": str(data), "artifacts_dir": str(tmp_path / "artifacts"), "num_workers": 0,
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow_experiment": "outage",
        "export": False, "threads": 1, "prefect_outage_wait_s": 0,
    })
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    home, log = tmp_path / "prefect-home", tmp_path / "run.log"
    with contextlib.ExitStack() as server:
        api_url = server.enter_context(prefect_server(home))
        with open(log, "w") as out:
            run = subprocess.Popen([sys.executable, "flows/train_flow.py", "--params", str(params)], cwd=REPO,
                                   env=prefect_env(home, api_url), stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _epochs_done(cfg) >= 1, "a first epoch", run, log)
            server.close()
            code = run.wait(timeout=300)
        finally:
            run.kill()
            run.wait()
    output = log.read_text()

    assert code == 3, output[-3000:]
    assert output.count(GONE) == 1 and BACK not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "final state did not reach it" in output.strip().splitlines()[-1]
    assert _epochs_done(cfg) == 2 and (cfg.eval_dir / "report.json").is_file()
    mlflow = MlflowClient(cfg.mlflow_tracking_uri)
    [mlflow_run] = mlflow.search_runs([mlflow.get_experiment_by_name("outage").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert "has been unreachable since" in mlflow_run.data.tags["harv_train.orchestrator_unreachable"]
