"""Real servers for tests (and benchmarks/bench_overhead.py): started on a free loopback port in their own process group, waited for
with a bounded health poll, and always stopped (the whole group: `mlflow server` forks uvicorn and a
job runner). A server that cannot start fails the test with its command, port and last log lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from harv_train.cli.startup import free_port  # noqa: F401  one free-port picker for the project

BIN = Path(sys.executable).parent  # the venv's console scripts: prefect, mlflow


class ServerStartError(RuntimeError):
    pass


class Server(NamedTuple):
    url: str
    proc: subprocess.Popen


def log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def running_server(
    name: str, cmd: list[str], health_url: str, log_path: Path, env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until `health_url` answers 200 (at most `timeout` s), yield, then stop it."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"{name} exited with code {proc.returncode} before answering {health_url} "
                    f"(port taken? see {log_path}):\n{log_tail(log_path)}")
            try:
                with urllib.request.urlopen(health_url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{name} did not answer {health_url} within {timeout:.0f}s (see {log_path}):\n{log_tail(log_path)}")
            time.sleep(0.5)
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if still there after `grace` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[Server]:
    """`mlflow server` with a SQLite backend and a local artifact root under `root`."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with running_server(f"mlflow server on port {port}", cmd, f"{url}/health", root / "server.log") as proc:
        yield Server(url, proc)


def worker_scratch(folder: Path) -> dict[str, str]:
    """TMPDIR for a Prefect process worker. The worker runs each flow run in a temporary folder
    (`tmpXXXXprefect`) that a killed worker never removes, nor what a killed run wrote there, and its
    runner keeps an empty `runner_storage/<uuid>` there after any stop. Under `folder`, the test
    removes them with `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"TMPDIR": str(folder)}


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment of a Prefect CLI, server or worker of its own: its PREFECT_HOME, its API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@contextmanager
def prefect_server(home: Path, port: int | None = None) -> Iterator[str]:
    """`prefect server start` (SQLite in `home`, no scheduler: no runs appear unless a test asks);
    yields its API URL."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--no-scheduler", "--analytics-off"]
    with running_server(f"prefect server on port {port}", cmd, f"{api_url}/health", home / "server.log",
                        env=prefect_env(home, api_url)):
        yield api_url


def postgres_binaries() -> Path | None:
    """The folder of the distribution's PostgreSQL server programs (initdb, postgres), if installed."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def _as_postgres_user() -> dict:
    """initdb and postgres refuse to run as root: as root, run them as the distribution's `postgres` user."""
    if os.geteuid() != 0:
        return {}
    import pwd

    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(port: int | None = None) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (the distribution's packages) on a loopback port, trusting local
    connections; yields the URL of its `postgres` database as SQLAlchemy takes it."""
    import shutil
    import tempfile

    binaries = postgres_binaries()
    if binaries is None:
        raise ServerStartError("PostgreSQL is not installed: apt-get install postgresql")
    port = port or free_port()
    as_user = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="harv-train-postgres-"))  # not under pytest's 0700 folders
    try:
        if as_user:
            os.chown(root, as_user["user"], as_user["group"])
        data, log_path = root / "data", root / "server.log"
        subprocess.run([str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, **as_user)
        log = open(log_path, "wb")
        proc = subprocess.Popen(
            [str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([str(binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                 capture_output=True).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerStartError(f"PostgreSQL on port {port} did not start:\n{log_tail(log_path)}")
                time.sleep(0.2)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            if proc.poll() is None:  # SIGINT: PostgreSQL's fast shutdown, which does not wait for clients
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            stop(proc)
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
