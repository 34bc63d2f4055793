"""The command line with the default params, out of memory: killed while it builds the decoded-image
cache, run again, it decodes what is missing and trains to the metrics of a run that reuses the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harv_train.config import load_config
from harv_train.core import checkpoints as ckpt

REPO = Path(__file__).resolve().parent.parent


def _train(data: Path, work: Path, cache: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    settings = {
        "pretrained": "false", "epochs": "2", "batch_size": "4", "img_size": "32", "classes": "null",
        "data_dir": str(data), "artifacts_dir": str(work / "artifacts"),
        "mlflow_tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "registered_model_name": "null",
        "export": "false", "epoch_retries": "0",
        "cache_dir": str(cache), "cache_max_mb": "0",  # never held in memory: every batch is read from the cache file
    }
    env = {k: v for k, v in os.environ.items() if k != "HARV_TRAIN_FAILPOINT"}
    if failpoint:
        env["HARV_TRAIN_FAILPOINT"] = failpoint
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run(  # in `work`: MLflow's default artifact root (./mlruns) lands there
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--params", str(REPO / "params.yaml"),
         *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )


def _history(work: Path) -> list[tuple]:
    state = ckpt.load_checkpoint(work / "artifacts" / "checkpoints" / ckpt.LAST)
    return [(m["train_loss"], m["train_acc"], m["val_loss"], m["val_acc"]) for m in state["history"]]


def test_killed_during_the_cache_build_the_next_run_trains_like_one_that_reuses_the_cache(image_folder, tmp_path):
    assert load_config(REPO / "params.yaml").num_workers > 0  # the default: decoding in worker processes
    cache = tmp_path / "cache"
    killed = _train(image_folder, tmp_path / "killed", cache, failpoint="cache_write:2")
    assert killed.returncode == -9, killed.stderr[-3000:]

    rebuilt = _train(image_folder, tmp_path / "rebuilt", cache)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    out = rebuilt.stdout + rebuilt.stderr
    assert "Decoded images: 16 train (" in out and "decoded now), 8 val (8 decoded now)" in out
    assert "is read from there batch by batch" in out and "exited unexpectedly" not in out

    reused = _train(image_folder, tmp_path / "reused", cache)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert "Decoded images: 16 train (0 decoded now), 8 val (0 decoded now)" in reused.stdout + reused.stderr
    assert _history(tmp_path / "rebuilt") == _history(tmp_path / "reused")
    assert len(_history(tmp_path / "reused")) == 2
