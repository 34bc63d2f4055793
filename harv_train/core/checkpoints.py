"""Checkpoints: plain dicts written atomically, loadable with `torch.load(..., weights_only=True)`.

`ARTIFACTS_DIR/checkpoints/` holds:
- `last.pth`: the state after the newest completed epoch; what `--resume` and epoch retries load.
- `best_model.pth`: the epoch with the best validation accuracy so far.
- `final_model.pth`: the last epoch of a finished run.
Each file is written to a temporary file in the same folder, flushed to disk, then renamed over the
old one (`os.replace` is atomic on POSIX), so a crash leaves either the old or the new file, never
half of one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from harv_train.errors import CheckpointError
from harv_train.core.failpoints import armed, failpoint

LAST = "last.pth"
BEST = "best_model.pth"
FINAL = "final_model.pth"
FORMAT = "harv-train/1"  # marks a file as one of ours

REQUIRED_KEYS = ("format", "model", "optimizer", "scheduler", "epoch", "best_val_acc", "classes", "params")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would make checkpoints unreadable to the team
            torch.save({"format": FORMAT, **state}, _PartialWriteFailpoint(f) if armed("checkpoint_partial") else f)
            f.flush()
            os.fsync(f.fileno())
        failpoint("checkpoint_write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _PartialWriteFailpoint:
    """The file torch.save writes to, with the failure point `checkpoint_partial` once its first chunk
    is on disk: a kill there leaves a temporary file holding part of a checkpoint."""

    def __init__(self, f):
        self._f, self._writes = f, 0

    def write(self, data) -> int:
        written = self._f.write(data)
        self._writes += 1
        if self._writes == 2:
            self._f.flush()
            failpoint("checkpoint_partial")
        return written

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power loss, not only a process kill.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train first, or point at an existing .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load checkpoint {path} ({type(exc).__name__}): it is not a harv-train checkpoint or is damaged"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a harv-train checkpoint: give a file written by flows/train_flow.py")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is damaged or from another version")
    return state


def record_mlflow_run_id(directory: str | Path, run_id: str) -> None:
    """Write `run_id` into the run's checkpoints that have none: an MLflow run opened only at the end
    (the store was down when the run started) is the one `--resume` must continue, not open another."""
    for name in (LAST, FINAL, BEST):
        path = Path(directory) / name
        if path.is_file():
            state = load_checkpoint(path)
            if not state.get("mlflow_run_id"):
                save_checkpoint({**state, "mlflow_run_id": run_id}, path)


def remove_stale_temporaries(directory: str | Path) -> None:
    """Temporary files a killed run left behind: never a complete checkpoint, safe to delete."""
    for tmp in Path(directory).glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)


def load_model_from_checkpoint(state: dict[str, Any]) -> "torch.nn.Module":
    """An nn.Module in eval mode with a checkpoint's weights (for logging, evaluation, export)."""
    from harv_train.core.models import build_architecture

    model = build_architecture(state["model_name"], len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.eval()


def archive_previous_checkpoints(directory: Path, companions: tuple[Path, ...] = ()) -> Path | None:
    """A fresh run never overwrites an earlier run's checkpoints: they move aside, whole, named by
    when that run last wrote one (not the folder's time: write checks touch it), with the folders
    made from them (`companions`: its evaluation report and export)."""
    checkpoints = list(directory.glob("*.pth")) if directory.is_dir() else []
    if not checkpoints:
        return None
    written = max(path.stat().st_mtime for path in checkpoints)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(written))
    target = directory.with_name(f"checkpoints-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"checkpoints-{stamp}-{n}")
    directory.rename(target)
    for made_from_them in companions:
        if made_from_them.is_dir():
            made_from_them.rename(target / made_from_them.name)
    return target
