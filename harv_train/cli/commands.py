"""What every command line of the project does with a flow run's outcome."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, NoReturn

from harv_train.errors import UserError


# The training completed, but the Prefect API was still unreachable at its end: Prefect holds no
# final state of the flow run (docs/failures.md).
EXIT_ORCHESTRATOR_UNREACHABLE = 3


def end_now(code: int) -> NoReturn:
    """Exit at once with `code`, output flushed, skipping exit hooks: for a run whose Prefect API is
    gone, whose log and event queues would otherwise retry it at exit for minutes."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
