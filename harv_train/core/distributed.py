"""Data-parallel epochs under PyTorch's elastic launcher (torchrun).

With `distributed.nproc_per_node x nnodes` > 1, the flow's epoch task calls `launch_epoch`, which runs

    python -m torch.distributed.run --nproc_per_node N ... -m harv_train.core.distributed --params P --epoch E

Each worker (`main` below) joins the process group, trains the epoch as its rank in a
`TrainingSession` of its own, and exits; rank 0 writes the checkpoints, so the task reads the epoch's
metrics back from `last.pth`.
Who handles what: torchrun's `--max-restarts` (distributed.max_restarts) restarts all workers of the
epoch when one dies, from the same last.pth; when those are used up torchrun exits non-zero, the
task fails, and Prefect's task retries (epoch_retries) launch the epoch again.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from harv_train.config import TrainConfig, load_config, write_params_file
from harv_train.core import checkpoints as ckpt
from harv_train.core.run_state import EpochMetrics

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def torchrun_command(cfg: TrainConfig, params_file: Path, epoch: int, run_id: str, log_dir: str) -> list[str]:
    d = cfg.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={d.nproc_per_node}",
           f"--max_restarts={d.max_restarts}", f"--log-dir={log_dir}"]
    if d.nnodes == 1:
        cmd.append("--standalone")  # a free local port for the rendezvous: no clash between runs
    else:
        cmd += [f"--nnodes={d.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={d.rdzv_endpoint}",
                f"--rdzv_id={run_id}-epoch{epoch}"]
    return cmd + ["-m", "harv_train.core.distributed", "--params", str(params_file), "--epoch", str(epoch)]


# A Python exception's last line ("ValueError: ..."), as a worker or torchrun's own agent prints it.
_EXCEPTION_LINE = re.compile(r"^\s*(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Timeout)):(.*)$")


def failure_cause(lines: list[str]) -> str:
    """The worker's exception in torchrun's output, rather than torchrun's own summary of it
    (ChildFailedError, whose last lines read "error_file: <N/A>")."""
    causes = [m for m in map(_EXCEPTION_LINE.match, lines)
              if m and not m.group(1).endswith("ChildFailedError")]
    if causes:
        return f"{causes[-1].group(1).rsplit('.', 1)[-1]}:{causes[-1].group(2)}".strip()
    exits = [line.strip() for line in lines if "exitcode" in line]
    return exits[-1] if exits else "see the log above"


def launch_epoch(cfg: TrainConfig, epoch: int) -> EpochMetrics:
    """Train one epoch with torchrun; returns its metrics as `TrainingSession.train_epoch` would."""
    params_file = cfg.checkpoints_dir / "torchrun-params.yaml"
    write_params_file(cfg, params_file)
    run_id = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)["run_uid"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("OMP_NUM_THREADS", "1")  # workers set their own thread count; silences torchrun's notice
    # torchrun's per-attempt directories (empty: worker output comes through the pipe) would otherwise
    # be left in /tmp, one set per epoch.
    with tempfile.TemporaryDirectory(prefix="harv-train-torchrun-") as log_dir:
        cmd = torchrun_command(cfg, params_file, epoch, run_id, log_dir)
        logger.info(f"Launching {cfg.distributed.world_size} processes: {' '.join(cmd[1:])}")
        with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1) as proc:
            tail: collections.deque[str] = collections.deque(maxlen=400)
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(
            f"torchrun exited with code {proc.returncode} in epoch {epoch + 1}: {failure_cause(list(tail))}"
        )
    state = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
    if state["epoch"] <= epoch:
        raise RuntimeError(f"torchrun finished epoch {epoch + 1} but {ckpt.LAST} holds {state['epoch']} epochs")
    return EpochMetrics.from_dict(state["history"][epoch])


def _backend(cfg: TrainConfig) -> str:
    import torch

    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if cfg.device != "cpu" and torch.cuda.is_available() else "gloo"


def _init_process_group(backend: str) -> None:
    """Join the process group through a store prefix of this launch of the workers.

    After torchrun restarts the workers, the agent's store still holds the killed workers' gloo
    addresses under the default keys; a fresh prefix per restart keeps the new workers from dialling
    the dead ones (which fails with "Connection refused" or hangs)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=float(os.environ.get("HARV_TRAIN_DIST_TIMEOUT_S", "600")))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"harv-train/launch-{restart}", store),
                            rank=rank, world_size=world_size, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    """One torchrun worker: train one epoch as this rank."""
    import torch
    import torch.distributed as dist

    from harv_train.core.engine import World
    from harv_train.core.session import TrainingSession

    parser = argparse.ArgumentParser(description="one data-parallel epoch (started by torchrun)")
    parser.add_argument("--params", required=True)
    parser.add_argument("--epoch", type=int, required=True)
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    backend = _backend(cfg)
    if backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        cfg = cfg.model_copy(update={"device": f"cuda:{local_rank}"})
    _init_process_group(backend)
    try:
        world = World(dist.get_rank(), dist.get_world_size())
        if world.rank == 0:  # bare lines: they reach the user through launch_epoch's log, which adds the prefix
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logging.getLogger("harv_train").addHandler(handler)
            logging.getLogger("harv_train").setLevel(logging.INFO)
        TrainingSession(cfg).train_epoch(args.epoch, world=world, progress=False)
        dist.barrier()  # rank 0 has written the checkpoint before any rank reports success
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
