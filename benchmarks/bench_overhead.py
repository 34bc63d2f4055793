"""Where the time of `python flows/train_flow.py` goes outside the epochs.

    .venv/bin/python benchmarks/bench_overhead.py            # demo data at 32 px: the epochs cost ~nothing

Runs the real command line in a fresh process (no PREFECT_API_URL: it starts Prefect's temporary
server, as a user's first run does), on tiny data, with 1 and with N epochs, and reads each output
line's arrival time. Reports:
- fixed cost: the wall time of a 1-epoch run minus that epoch's own work (train + val), split into
  start-up (imports, input checks) / Prefect server start / flow up to the first epoch / after the
  last epoch (final checkpoint, MLflow logging including the model) / shutdown; and the same against
  a running `prefect server start` (PREFECT_API_URL set), where no server starts per run;
- the post-training evaluation and export, measured separately by a run with `export: true`;
- per-epoch overhead of Prefect + MLflow, inside one N-epoch run: the time between two epoch tasks
  finishing minus the epoch's own train + val work (checkpoint writes count as overhead here).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_workdir import bench_workdir  # noqa: E402
from tests.servers import prefect_server  # noqa: E402  the tests' real-server helper

MARKERS = {
    "flow_begin": "Beginning flow run",
    "total": "[train] Total time",
}
EPOCH_DONE = re.compile(r"Task run 'epoch-(\d+)' - Finished")


def run_cli(work: Path, data: Path, epochs: int, export: bool, tag: str, api_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    cmd = [sys.executable, "flows/train_flow.py",
           "--set", "model_name=mobilenet_v3_small", "--set", "pretrained=false", "--set", "img_size=32",
           "--set", f"epochs={epochs}", "--set", f"export={str(export).lower()}", "--set", "classes=null",
           "--set", f"data_dir={data}", "--set", f"artifacts_dir={work / ('art-' + tag)}",
           "--set", f"mlflow_tracking_uri=sqlite:///{work / 'mlflow.db'}",  # one store, as a user's runs share
           "--set", "registered_model_name=null", "--set", "early_stopping_patience=0"]
    start = time.perf_counter()
    times: dict[str, float] = {}
    epoch_done: dict[int, float] = {}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        now = time.perf_counter() - start
        for key, marker in MARKERS.items():
            if marker in line:
                times.setdefault(key, now)
        if match := EPOCH_DONE.search(line):
            epoch_done.setdefault(int(match.group(1)), now)
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: the training command failed with exit code {proc.returncode}")
    import torch

    state = torch.load(work / f"art-{tag}" / "checkpoints" / "final_model.pth", weights_only=True)
    epoch_work = [m["train_time_s"] + m["val_time_s"] for m in state["history"]]
    return {"wall": wall, "times": times, "epoch_done": [epoch_done[i] for i in sorted(epoch_done)],
            "epoch_work": epoch_work}


def per_epoch_overhead(run: dict) -> float:
    """Between two epoch tasks finishing, what was not the epoch's own train + val work."""
    done, work = run["epoch_done"], run["epoch_work"]
    gaps = [done[i] - done[i - 1] - work[i] for i in range(1, len(done))]
    return sum(gaps) / len(gaps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the long run (default 6)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (data, runs) for a look")
    args = parser.parse_args(argv)
    with bench_workdir("harv-overhead-", args.keep) as work:
        return _measure(args, work)


def _measure(args: argparse.Namespace, work: Path) -> dict:
    from harv_train.demo_data import write_demo_dataset

    data = work / "data"
    write_demo_dataset(data)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flows.train_flow"], cwd=REPO, check=True)
    import_s = time.perf_counter() - t0

    # The first run creates Prefect's database in PREFECT_HOME and MLflow's mlflow.db; the runs
    # measured after it find them there, as every run but a user's very first does.
    many = run_cli(work, data, args.epochs, False, "many")
    one = run_cli(work, data, 1, False, "one")
    exported = run_cli(work, data, 1, True, "export")
    with prefect_server(work / "prefect-server-home") as api_url:  # as `make server` runs it
        served = run_cli(work, data, 1, False, "served", api_url)

    t = one["times"]
    parts = {
        "start-up: imports, input checks (Prefect's temporary server boots meanwhile)": t["flow_begin"],
        "flow start to end of epoch 1, minus the epoch's work": one["epoch_done"][0] - t["flow_begin"]
        - one["epoch_work"][0],
        "after the last epoch: final checkpoint, MLflow logging incl. the model, evaluation": t["total"] - one["epoch_done"][0],
        "Prefect artifacts, end of the flow run, exit": one["wall"] - t["total"],
    }
    summary = {
        "import_flow_module_s": round(import_s, 2),
        "fixed_cost_s": round(one["wall"] - sum(one["epoch_work"]), 2),
        "fixed_parts_s": {k: round(v, 2) for k, v in parts.items()},
        "fixed_cost_with_running_server_s": round(served["wall"] - sum(served["epoch_work"]), 2),
        "evaluation_and_export_s": round(exported["wall"] - sum(exported["epoch_work"]) - one["wall"]
                                         + sum(one["epoch_work"]), 2),
        "per_epoch_overhead_s": round(per_epoch_overhead(many), 3),
        "epochs": args.epochs,
    }
    print(f"import flows.train_flow alone: {import_s:.2f}s")
    print(f"fixed cost of a run outside its epochs (temporary Prefect server): {summary['fixed_cost_s']:.2f}s")
    for name, value in parts.items():
        print(f"  {value:6.2f}s  {name}")
    print(f"fixed cost against a running Prefect server (PREFECT_API_URL set): "
          f"{summary['fixed_cost_with_running_server_s']:.2f}s")
    print(f"evaluation + export after training (export: true): {summary['evaluation_and_export_s']:.2f}s more")
    print(f"Prefect + MLflow overhead per epoch: {summary['per_epoch_overhead_s']:.3f}s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
