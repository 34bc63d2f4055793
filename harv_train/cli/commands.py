"""What every command line of the project does with a flow run's outcome."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from typing import Any, Callable, NoReturn

from harv_train.errors import UserError


def run_flow_command(start: Callable[[], Any]) -> tuple[int, Any]:
    """Run `start` (input checks, then a flow called with return_state=True) and turn its outcome
    into an exit code: 0 completed; 2 bad input, printed as one `error:` line with no traceback;
    1 a failed flow run, its message printed the same way. Returns (exit code, final state or None)."""
    try:
        state = start()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code, None
    if not state.is_completed():
        print(f"error: {state.message}", file=sys.stderr)
        return 1, state
    return 0, state


def check_command_line(check: Callable[[], Any]) -> int | None:
    """Run `check` (argument parsing, params validation): None when it passes, else the exit code
    (argparse's own for --help and usage errors; 2 with one `error:` line for bad input)."""
    try:
        check()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return None


class FastCommand:
    """How a flow's command line starts and ends. Created first thing, before the heavy imports: it
    answers --help, usage errors and bad params at once (`check`), then starts Prefect's temporary
    server so that it boots while the imports run (harv_train/cli/startup.py). `run(main)` then runs
    the command and ends the process right after its exit hooks (ExitWithoutTeardown)."""

    def __init__(self, check: Callable[[], Any]) -> None:
        self._exit = ExitWithoutTeardown()
        code = check_command_line(check)
        if code is not None:
            self._exit.code = code
            raise SystemExit(code)
        from harv_train.cli.startup import start_early_server

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
