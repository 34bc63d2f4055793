"""Does a sweep beat the default params on data it never saw? And what do two workers give?

    .venv/bin/python benchmarks/bench_sweep.py accuracy --out /tmp/bench-sweep [--trials 16]
    .venv/bin/python benchmarks/bench_sweep.py workers --out /tmp/bench-workers [--trials 4]

Held-out data: scikit-learn's bundled digits (1797 8x8 images, 10 classes; not the demo data),
split per class (seed 0) into 20 train, 10 val and the rest (~1500) test, written as PNG ImageFolders.
Every run: efficientnet_lite0 with its bundled ImageNet weights (no download), 32 px, 2 epochs.

`accuracy` (`--which default|best|both`, to run the parts in separate processes): a `--trials` sweep (`python flows/sweep_flow.py`, built-in space) picks params on val;
then the best params and the defaults are each trained with seeds 42, 43, 44 and their best
checkpoints evaluated on test. Prints the sweep's wall time, each test accuracy and the means.

`workers`: the same sweep (`--trials`, 1 epoch each) run through a real Prefect server with 1 process
worker (`--parallel 1`) and then with 2 (`--parallel 2`), side by side: wall times and their ratio,
and which worker ran each trial (none twice). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PY = sys.executable

FIXED = {"model_name": "efficientnet_lite0", "pretrained": True, "img_size": 32, "epochs": 2, "num_workers": 0,
         "export": False, "classes": None}


TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 10  # small train/val: the trials fit a loaded 2-core machine; the rest is test


def write_digits(root: Path) -> Path:
    """digits as train/val/test ImageFolders: 20 train and 10 val images per class (seed 0), the other
    ~1500 images the test set."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / "test").is_dir():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        end_val = TRAIN_PER_CLASS + VAL_PER_CLASS
        parts = {"train": idx[:TRAIN_PER_CLASS], "val": idx[TRAIN_PER_CLASS:end_val], "test": idx[end_val:]}
        for split, members in parts.items():
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels, "L").convert("RGB").save(folder / f"{i}.png")
    return root


def _params(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return time.perf_counter() - started


def _test_accuracy(artifacts: Path, test_dir: Path) -> float:
    from harv_train.reporting.evaluation import evaluate_checkpoint

    report = evaluate_checkpoint(artifacts / "checkpoints" / "best_model.pth", test_dir, artifacts / "test-eval")
    return report.metrics.accuracy


def accuracy(out: Path, trials: int, which: str) -> dict:
    """`which`: both (the sweep, then both trainings), default (the defaults only), or best (the best
    params of the sweep already in `out`, which is run first when it is not there)."""
    import yaml

    data = write_digits(out / "digits")
    base = {**FIXED, "data_dir": str(data), "mlflow_tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "mlflow_experiment": "bench-sweep"}
    results = {"trials": trials}
    runs = [("default", base)] if which in ("both", "default") else []
    if which != "default":
        best_file = out / "sweep" / "best" / "params.yaml"
        if not best_file.is_file():
            sweep_params = _params(out / "sweep-params.yaml", {**base, "artifacts_dir": str(out / "sweep")})
            sweep_s = _run([PY, "flows/sweep_flow.py", "--trials", str(trials), "--params", str(sweep_params)],
                           out / "sweep.log")
            results["sweep_wall_s"] = round(sweep_s, 1)
            print(f"sweep of {trials} trials: {sweep_s:.1f} s", flush=True)
        best = yaml.safe_load(best_file.read_text())
        results["best_params"] = {k: best[k] for k in ("lr", "freeze_ratio", "weight_decay", "batch_size",
                                                       "lr_factor", "lr_patience")}
        runs.append(("best", {**best, "data_dir": str(data)}))
    for name, values in runs:
        accs = []
        for seed in (42, 43, 44):
            artifacts = out / f"{name}-{seed}"
            params = _params(out / f"{name}-{seed}.yaml", {**values, "seed": seed, "artifacts_dir": str(artifacts),
                                                           "registered_model_name": None})
            _run([PY, "flows/train_flow.py", "--params", str(params)], out / f"{name}-{seed}.log")
            accs.append(round(_test_accuracy(artifacts, data / "test"), 4))
            print(f"{name} seed {seed}: test accuracy {accs[-1]:.4f}", flush=True)
        results[f"{name}_test_acc"] = accs
        results[f"{name}_test_acc_mean"] = round(sum(accs) / len(accs), 4)
    return results


def workers(out: Path, trials: int) -> dict:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

    from tests.servers import BIN, prefect_env, prefect_server, stop

    data = write_digits(out / "digits")
    results = {"trials": trials}
    with prefect_server(out / "prefect-home") as api_url:
        env = {**prefect_env(out / "prefect-home", api_url), "PREFECT_WORKER_QUERY_SECONDS": "2"}
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", "bench", "--type", "process"], env=env,
                       cwd=REPO, check=True, capture_output=True)
        for n in (1, 2):
            procs = [subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "bench", "--limit", "1",
                                       "--name", f"worker-{n}-{i}"], cwd=out, env=env, start_new_session=True,
                                      stdout=open(out / f"worker-{n}-{i}.log", "wb"), stderr=subprocess.STDOUT)
                     for i in range(n)]
            try:
                time.sleep(5)
                params = _params(out / f"workers-{n}.yaml", {
                    **FIXED, "epochs": 1, "data_dir": str(data), "artifacts_dir": str(out / f"sweep-{n}"),
                    "mlflow_tracking_uri": f"sqlite:///{out / f'mlflow-{n}.db'}"})
                wall = _run([PY, "flows/sweep_flow.py", "--trials", str(trials), "--params", str(params),
                             "--workers", "pool:bench", "--parallel", str(n)], out / f"sweep-{n}.log", env=env)
            finally:
                for p in procs:
                    stop(p)
            with SyncPrefectClient(api_url) as client:
                runs = [r for r in client.read_flow_runs() if r.name.startswith("trial-")
                        and r.parameters.get("overrides", {}).get("artifacts_dir", "").startswith(str(out / f"sweep-{n}"))]
            by_worker = {}  # which worker trained each trial: the MLflow tag the training run sets
            mlflow = MlflowClient(f"sqlite:///{out / f'mlflow-{n}.db'}")
            for r in mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()]):
                if "sweep.trial" in r.data.tags:
                    by_worker.setdefault(r.data.tags.get("prefect.worker", "?"), []).append(int(r.data.tags["sweep.trial"]))
            results[f"{n}_workers"] = {"wall_s": round(wall, 1), "trial_runs": len(runs),
                                       "distinct_trials": len({r.name for r in runs}),
                                       "trials_per_min": round(trials / wall * 60, 2), "by_worker": by_worker}
            print(f"{n} worker(s): {wall:.1f} s, {len(runs)} trial runs: {by_worker}", flush=True)
    results["speedup_2_over_1"] = round(results["1_workers"]["wall_s"] / results["2_workers"]["wall_s"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/bench_sweep.py")
    parser.add_argument("part", choices=("accuracy", "workers"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--which", choices=("both", "default", "best"), default="both",
                        help="accuracy: train the defaults, the sweep's best params, or both")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    os.environ.setdefault("HARV_TRAIN_CACHE_DIR", str(args.out.resolve() / "cache"))  # not ~/.cache
    uptime = os.getloadavg()
    if args.part == "accuracy":
        results = accuracy(args.out.resolve(), args.trials or 16, args.which)
    else:
        results = workers(args.out.resolve(), args.trials or 4)
    results["loadavg_at_start"] = [round(x, 2) for x in uptime]
    results["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
