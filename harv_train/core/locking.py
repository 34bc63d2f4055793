"""One training run per artifacts_dir at a time.

An exclusive `flock` on `ARTIFACTS_DIR/.lock`: the kernel drops it when the holder exits, even on
kill -9, so a crashed run never leaves a stale lock behind. Re-entrant within one process, so the
command line's up-front check and the flow can both hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from harv_train.errors import ArtifactsBusyError, UserError

_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth)


@contextlib.contextmanager
def artifacts_lock(artifacts_dir: str | Path) -> Iterator[Path]:
    directory = Path(artifacts_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create artifacts_dir {directory} ({exc.strerror}): choose a writable artifacts_dir") from None
    lock_path = directory / ".lock"
    key = str(lock_path.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"artifacts_dir {directory} is not writable ({exc.strerror}): fix its permissions or choose another") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArtifactsBusyError(
                f"artifacts_dir {directory} is in use by a running training ({holder}): wait for it to finish, "
                "or set artifacts_dir to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        _held[key] = (fd, 1)
    try:
        yield lock_path
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            os.close(fd)  # closing releases the flock
