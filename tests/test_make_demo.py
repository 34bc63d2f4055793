"""`make demo`, the README's first command, run as written: in a copy of the checkout's files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent


def _copy_of_the_checkout(dest: Path) -> Path:
    """The tracked files (what a clone has) plus the existing .venv, linked: make's install step is then
    a no-op when the lock is unchanged, as on a second `make demo`."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to((REPO / ".venv").resolve(), target_is_directory=True)
    return dest


@pytest.mark.skipif(shutil.which("make") is None or not (REPO / ".venv" / "bin" / "python").exists(),
                    reason="needs make and the checkout's .venv (make test creates it)")
def test_make_demo_writes_the_demo_data_trains_and_registers_the_demo_model(tmp_path):
    clone = _copy_of_the_checkout(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    # Two epochs instead of ten (ARGS is the Makefile's documented way to pass more options).
    result = subprocess.run(["make", "demo", "ARGS=--set epochs=2"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    demo = clone / "data" / "demo"
    assert sorted(p.name for p in (demo / "train").iterdir()) == sorted(p.name for p in (demo / "val").iterdir())
    assert len(list((demo / "train").rglob("*.*"))) > 50
    best = torch.load(clone / "artifacts" / "demo" / "checkpoints" / "best_model.pth", weights_only=False)
    assert best["model_name"] == "efficientnet_lite0" and best["classes"] == sorted(p.name for p in (demo / "train").iterdir())
    assert "Logged the best model to MLflow: models:/" in output

    client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("harv-train-demo", "champion")
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model_name"] == "efficientnet_lite0"
    assert [m.step for m in client.get_metric_history(champion.run_id, "val_acc")] == [1, 2]
    assert (clone / "mlruns").is_dir(), "the store's files sit beside mlflow.db in the clone"
