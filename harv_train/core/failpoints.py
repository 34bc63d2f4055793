"""Named failure points, for testing what a crash or an I/O error at a given moment does.

Off unless `HARV_TRAIN_FAILPOINT` is set, as `NAME:N` or `NAME:N:ACTION`: the N-th time this process
passes `failpoint(NAME)`, ACTION happens: `kill` (default) sends SIGKILL to the process itself, the
same as `kill -9` from outside; `raise` raises an OSError, like a failing disk read. `NAME:N+:ACTION` acts on the
N-th and every later pass (an outage rather than a blip). Several failpoints may be given,
separated by commas. Under torchrun, `HARV_TRAIN_FAILPOINT_RANK=R` limits them to rank R, and they never fire
after the elastic agent restarted the workers. Points: `train_batch` (after each training step),
`checkpoint_partial` (inside a checkpoint write: part of the temporary file is on disk),
`checkpoint_write` (temporary file written, not yet renamed), `mlflow_log` (before each MLflow call),
`mlflow_request` (inside each HTTP request to an MLflow server: the server has answered, the client
has not read the answer), `cache_write` (a chunk of the decoded-image cache is written, its index does
not name it yet).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def _armed() -> dict[str, tuple[int, bool, str]]:
    spec = os.environ.get("HARV_TRAIN_FAILPOINT", "")
    armed = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition(":")
        count, _, action = rest.partition(":")
        armed[name] = (int(count.rstrip("+") or 1), count.endswith("+"), action or "kill")
    return armed


def armed(name: str) -> bool:
    """Whether HARV_TRAIN_FAILPOINT names this point (for points that need setting up first)."""
    return "HARV_TRAIN_FAILPOINT" in os.environ and name in _armed()


def failpoint(name: str) -> None:
    if "HARV_TRAIN_FAILPOINT" not in os.environ:
        return
    # Under torchrun: only in the rank named by HARV_TRAIN_FAILPOINT_RANK (if set), and only in the
    # first launch of the workers, so that a restart by the elastic agent can recover.
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if os.environ.get("HARV_TRAIN_FAILPOINT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    armed = _armed()
    if name not in armed:
        return
    _hits[name] += 1
    count, and_later, action = armed[name]
    if _hits[name] < count or (_hits[name] > count and not and_later):
        return
    if action == "raise":
        raise OSError(f"failpoint {name}: simulated I/O error (HARV_TRAIN_FAILPOINT)")
    os.kill(os.getpid(), signal.SIGKILL)
