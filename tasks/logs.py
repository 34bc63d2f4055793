"""The library logs with the standard `logging` module; inside a Prefect run its lines go to the run's log."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

LIBRARY_LOGGER = "harv_train"


class _ToRunLogger(logging.Handler):
    """Forwards a record to the logger of the flow or task run of the calling thread."""

    def __init__(self, prefix: str):
        super().__init__(logging.INFO)
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            run_logger = get_run_logger()
        except MissingContextError:  # a thread outside the run: keep the line anyway
            print(f"{self.prefix} {record.getMessage()}", file=sys.stderr)
            return
        run_logger.log(record.levelno, f"{self.prefix} {record.getMessage()}")


@contextlib.contextmanager
def library_logs_in_run(prefix: str) -> Iterator[None]:
    """Around a flow's body: harv_train's INFO lines and above appear in the run's log, `prefix` first."""
    library = logging.getLogger(LIBRARY_LOGGER)
    handler, level, propagate = _ToRunLogger(prefix), library.level, library.propagate
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # the run's log prints them already; no second copy through the root
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
        library.propagate = propagate
