"""The working directory of one benchmark call: removed afterwards, kept when asked or on failure."""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def bench_workdir(prefix: str, keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"kept {work} for a look", file=sys.stderr)
        raise
    if keep:
        print(f"kept {work}")
    else:  # hundreds of MB of data, checkpoints and runs per call
        shutil.rmtree(work, ignore_errors=True)
