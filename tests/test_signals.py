"""SIGTERM, what Kubernetes and most schedulers send before SIGKILL: the run stops at once, keeps its
last completed epoch, marks its MLflow run KILLED, and a later --resume equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harv_train.config import write_params_file
from harv_train.core import checkpoints as ckpt
from tests.trained import train_epochs

REPO = Path(__file__).resolve().parent.parent
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
GRACE_S = 10  # what the issue asks: well inside a scheduler's grace period before its SIGKILL

pytestmark = pytest.mark.usefixtures("prefect_server")


def _cli(params: Path, *args: str, **popen) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("HARV_TRAIN_FAILPOINT", None)
    return subprocess.Popen([sys.executable, "flows/train_flow.py", "--params", str(params), *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for_epoch(cfg, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    last = cfg.checkpoints_dir / ckpt.LAST
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and ckpt.load_checkpoint(last)["epoch"] >= epoch:
            return
        time.sleep(0.2)
    raise AssertionError(f"epoch {epoch} never reached last.pth (exit {proc.poll()})")


def test_sigterm_stops_the_run_keeps_the_last_epoch_and_resume_equals_an_uninterrupted_run(make_config, tmp_path):
    # 64 px: an epoch lasts long enough that SIGTERM, sent when epoch 1 is on disk, lands inside epoch 2.
    cfg = make_config(epochs=3, img_size=64)
    reference = [m.to_dict() for m in train_epochs(make_config(epochs=3, img_size=64,
                                                               artifacts_dir=str(tmp_path / "ref64")))]
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)

    proc = _cli(params)
    _wait_for_epoch(cfg, 1, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode != 0 and took < GRACE_S, (took, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    assert "termination signal" in output  # the flow run's one-line reason (Prefect: Crashed)

    state = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
    assert state["epoch"] in (1, 2)  # the last completed epoch; the interrupted one is not in it
    run_id = state["mlflow_run_id"]
    assert MlflowClient(cfg.mlflow_tracking_uri).get_run(run_id).info.status == "KILLED"

    resumed = _cli(params, "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    final = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)
    assert final["mlflow_run_id"] == run_id
    for got, want in zip(final["history"], reference, strict=True):
        assert [got[k] for k in METRICS] == pytest.approx([want[k] for k in METRICS], rel=1e-5, abs=1e-6)
    assert MlflowClient(cfg.mlflow_tracking_uri).get_run(run_id).info.status == "FINISHED"
