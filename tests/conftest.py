"""Shared fixtures: tiny image datasets made in the test, a config factory, and a real Prefect server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The tests see no GPU unless HARV_TRAIN_GPU_TESTS=1 (benchmarks/gpu_check.sh): on a machine with one,
# device auto stays the CPU and the CPU tests compute what they compute in CI.
if os.environ.get("HARV_TRAIN_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Before anything imports Prefect: never touch the user's ~/.prefect, no telemetry, and the
# tests' own temporary server rather than whatever PREFECT_API_URL the shell has.
_PREFECT_HOME = tempfile.mkdtemp(prefix="harv-train-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
os.environ.setdefault("HARV_TRAIN_DIST_TIMEOUT_S", "60")  # a stuck collective fails a test, not CI
os.environ["HARV_TRAIN_OFFLINE"] = "1"  # no test downloads weights, network or not (one serves them itself)
# The decoded-image cache of every run the tests start (and their subprocesses): not the user's ~/.cache.
_CACHE_DIR = tempfile.mkdtemp(prefix="harv-train-cache-")
os.environ["HARV_TRAIN_CACHE_DIR"] = _CACHE_DIR

import contextlib
import subprocess
import sys

import pytest

from harv_train.config import load_config
from tests.images import write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def make_config(tmp_path: Path, image_folder: Path):
    """A fast config on the tiny dataset: random-init MobileNetV3-Small at 32 px, local MLflow store."""

    def make(**overrides):
        values = {
            "model_name": "mobilenet_v3_small",
            "pretrained": False,
            "epochs": 2,
            "batch_size": 4,
            "img_size": 32,
            "lr": 0.001,
            "classes": None,
            "data_dir": str(image_folder),
            "artifacts_dir": str(tmp_path / "artifacts"),
            "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow_experiment": "tests",
            "num_workers": 0,
            "epoch_retries": 1,
            "export": False,  # seconds per flow run; tests/test_evaluate_flow.py turns it on where it matters
        }
        values.update(overrides)
        return load_config(None, values)

    return make


REPO = Path(__file__).resolve().parent.parent
# Where a run writes when a path or MLflow's default artifact root falls back to the working directory.
_RUN_OUTPUTS = ("mlruns", "mlartifacts", "mlflow.db", "artifacts", "data", "mlserver")


def _files_in_run_outputs() -> set[str]:
    found = set()
    for name in _RUN_OUTPUTS:
        top = REPO / name
        if top.is_file():
            found.add(name)
        for folder, _, files in os.walk(top):
            found.update(os.path.relpath(os.path.join(folder, f), REPO) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """The tests write only under their temporary directories: a test whose MLflow store, artifacts_dir
    or working directory falls back to the checkout fails the session here (README: make test leaves the
    checkout as it found it)."""
    before = _files_in_run_outputs()
    yield
    new = sorted(_files_in_run_outputs() - before)
    assert not new, f"the tests wrote {len(new)} file(s) into the checkout, e.g. {new[:5]}"


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)  # the tests' Prefect databases and logs
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server():
    """One real, temporary Prefect server (SQLite) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@contextlib.contextmanager
def lock_held_elsewhere(artifacts_dir: str):
    """Another process holding the artifacts_dir lock, as a running training does; yields its Popen."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from harv_train.core.locking import artifacts_lock\n"
         f"with artifacts_lock({artifacts_dir!r}):\n    print('locked', flush=True); time.sleep(60)"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
