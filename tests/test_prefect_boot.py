"""The command line starts Prefect's temporary server first thing, and never leaves it behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from harv_train.cli.startup import start_early_server
from tests.images import write_image_folder

REPO = Path(__file__).resolve().parent.parent


def _env_without_a_server(prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def test_the_command_line_runs_its_flow_on_the_server_it_started_and_prefect_keeps_the_run(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=4, n_val=2)
    result = subprocess.run(
        [sys.executable, "flows/train_flow.py", "--set", f"data_dir={data}", "--set", "classes=null",
         "--set", "model_name=mobilenet_v3_small", "--set", "pretrained=false", "--set", "img_size=32",
         "--set", "epochs=1", "--set", "batch_size=4", "--set", "export=false",
         "--set", f"artifacts_dir={tmp_path / 'artifacts'}", "--set", "registered_model_name=null",
         "--set", f"mlflow_tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=REPO, env=_env_without_a_server(tmp_path / "prefect-home"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[train] Prefect: temporary server for this run at http://127.0.0.1:" in result.stdout
    # The run, its final state and its last log line are in Prefect's database once the command returns.
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        assert db.execute("SELECT state_name FROM flow_run").fetchall() == [("Completed",)]
        assert db.execute("SELECT count(*) FROM log WHERE message LIKE 'Finished in state Completed%'").fetchone()[0] >= 1


def test_a_server_named_in_the_environment_is_left_to_prefect(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert start_early_server() is None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited, waiting for its new parent to reap it


def test_the_server_stops_when_its_process_is_killed(tmp_path):
    script = (
        "import os, signal\n"
        "from harv_train.cli.startup import start_early_server\n"
        "server = start_early_server()\n"
        "print(server.process.pid, flush=True)\n"
        "assert server.wait_until_up()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env_without_a_server(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    server_pid = int(killed.stdout.split()[0])
    deadline = time.monotonic() + 60  # how long a graceful shutdown may take, not a speed requirement
    while not _gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(server_pid)
