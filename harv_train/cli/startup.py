"""The command line's start-up and exit speed-ups, each kept because it is measured (docs/performance.md).

- `FastCommand`: --help, usage errors and bad params answer in 0.2 s, before the heavy imports (5-7 s otherwise).
- `EarlyServer`: Prefect's temporary server boots on the other core while torch imports (the flow
  begins about 3 s sooner).
- `ExitWithoutTeardown`: the process ends right after its exit hooks, skipping 1.7 s of interpreter
  teardown that writes nothing.

With no Prefect server configured, Prefect starts a temporary one when the flow begins and waits for
it (about 4 s here, the rest of the process idle), then waits again for its shutdown at exit (about
2 s). The command line instead starts the very same server (Prefect's own uvicorn command, its
database in PREFECT_HOME) on its first line, so it boots on the other core while this process
imports torch and checks the inputs, and points the flow at it with Prefect's
`temporary_settings`. At exit the server is told to stop and finishes its shutdown on its own.

Whenever Prefect is configured with a server (PREFECT_API_URL in the environment or the profile),
or this early start fails, Prefect's own behaviour applies unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from harv_train.cli.commands import check_command_line

_STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A loopback port nothing listens on now (a server started on it may still find it taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when this process dies, even by SIGKILL: never an orphan.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EarlyServer:
    """A Prefect server process started now, used by the flow only if it answers in time."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("prefect is not installed")
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.address}/api"
        app_dir = str(Path(spec.submodule_search_locations[0]).parent)
        # Prefect's own command for its temporary server (prefect.server.api.server.SubprocessASGIServer).
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # No output kept: a pipe to it would hold `... | tee` open through its shutdown after this
        # process exits. If it fails to answer, the flow falls back to Prefect's own, which reports.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        atexit.register(self.stop)

    def wait_until_up(self) -> bool:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return True
            except OSError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Ask the server to stop; it finishes its graceful shutdown without this process waiting."""
        if self.process.poll() is None:
            self.process.terminate()


def start_early_server() -> EarlyServer | None:
    """Start the server now unless the environment already names one (then Prefect decides)."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    try:
        return EarlyServer()
    except Exception:  # Prefect starts its own when the flow begins
        return None


@contextlib.contextmanager
def flow_server(early: EarlyServer | None, prefix: str = "[train]") -> Iterator[None]:
    """Around the flow run: point Prefect at the early server if Prefect would otherwise start a
    temporary one and the early server is up; otherwise change nothing."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_UI_URL,
        temporary_settings,
    )

    wanted = early is not None and not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()
    if not wanted or not early.wait_until_up():
        if early is not None:
            early.stop()  # a configured server (e.g. in the Prefect profile) or no answer: not ours to use
        yield
        return
    print(f"{prefix} Prefect: temporary server for this run at {early.address}, stopped at exit "
          "(to keep runs in a lasting one: make server, and PREFECT_API_URL)", flush=True)
    # No UI runs on it and it stops at exit: no "View at" link to a page that will not be there.
    with temporary_settings(updates={PREFECT_API_URL: early.api_url, PREFECT_UI_URL: ""}):
        yield


class FastCommand:
    """How a flow's command line starts and ends. Created first thing, before the heavy imports: it
    answers --help, usage errors and bad params at once (`check`), then starts Prefect's temporary
    server so that it boots while the imports run (EarlyServer). `run(main)` then runs
    the command and ends the process right after its exit hooks (ExitWithoutTeardown)."""

    def __init__(self, check: Callable[[], Any]) -> None:
        self._exit = ExitWithoutTeardown()
        code = check_command_line(check)
        if code is not None:
            self._exit.code = code
            raise SystemExit(code)
        self.early_server = start_early_server()

    def run(self, main: Callable[[Any], int]) -> NoReturn:
        """`main(early_server)` returns the exit code."""
        try:
            self._exit.code = main(self.early_server)
        except KeyboardInterrupt:
            self._exit.code = 130  # what a shell expects of Ctrl-C
            raise
        raise SystemExit(self._exit.code)


class ExitWithoutTeardown:
    """Ends a command-line process right after its exit hooks, skipping the interpreter's teardown.

    That teardown frees torch, MLflow and Prefect objects one by one: about 1.7 s here after every
    run, with nothing left to write by then (Prefect's log and event queues and MLflow's run are
    flushed by exit hooks, which still run). Create it first thing, so that its hook runs last.
    """

    def __init__(self) -> None:
        self.code = 1  # what Python itself returns for an uncaught exception
        atexit.register(self._exit)

    def _exit(self) -> None:
        if "logging" in sys.modules:
            logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.code)
