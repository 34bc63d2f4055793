"""Requests per second and latency of the registered model behind `mlflow models serve`, ONNX against PyTorch.

    .venv/bin/python benchmarks/bench_serving.py                          # efficientnet_lite0, 224 px
    .venv/bin/python benchmarks/bench_serving.py --model mobilenet_v3_small --seconds 20

Logs a 2-class model of `--model` (ImageNet weights for efficientnet_lite0, which ship offline; random
weights for the others: the speed is the same) as the pickle-free pyfunc of
harv_train/tracking/pyfunc_model.py into a temporary SQLite store, registers it as champion, and
starts two real `mlflow models serve -m models:/bench@champion --env-manager local` servers (one
uvicorn worker each, as by default), one with HARV_TRAIN_SERVING_RUNTIME=onnx and one with torch.
One client, one request at a time, sends base64 JPEG photos (crops of scikit-image's sample photos,
`--photo-size` px, as a camera or a phone would send them, so decoding and resizing count) in the
`dataframe_split` format: batch 1 and batch 16, the four cases taking turns request by request, so
that load from other processes slows them all alike. Per case: requests/s (= 1 / mean latency, one
client), images/s, p50 and p95 latency. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HARV_TRAIN_OFFLINE", "1")

from bench_workdir import bench_workdir  # noqa: E402
from tests.servers import BIN, free_port, running_server  # noqa: E402  the tests' real-server helper

RUNTIMES = ("onnx", "torch")
BATCHES = (1, 16)


def bench_state(model_name: str, img_size: int) -> dict:
    """A checkpoint-like state of a 2-class model, as log_image_classifier takes it."""
    import torch

    from harv_train.core.models import build_model, model_spec

    spec = model_spec(model_name)
    torch.manual_seed(0)
    model = build_model(model_name, 2, pretrained=model_name == "efficientnet_lite0").eval()
    return {"model": model.state_dict(), "model_name": model_name, "classes": ["cat", "coffee"],
            "img_size": img_size, "interpolation": spec.interpolation, "mean": list(spec.mean),
            "std": list(spec.std), "epoch": 0, "best_val_acc": 0.0}


def photos(size: int, n: int = 16) -> list[str]:
    """n base64 JPEGs of size x (3/4 size) px: crops of scikit-image's photos."""
    import numpy as np
    import skimage.data as sk
    from PIL import Image

    sources = [Image.fromarray(p) for p in (sk.chelsea(), sk.coffee(), sk.astronaut(), sk.rocket())]
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = img.size
        box_w = int(w * rng.uniform(0.6, 0.9))
        box_h = int(box_w * 3 / 4) if box_w * 3 / 4 <= h else h
        x, y = int(rng.integers(0, w - box_w + 1)), int(rng.integers(0, h - box_h + 1))
        crop = img.crop((x, y, x + box_w, y + box_h)).resize((size, size * 3 // 4), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def post(url: str, body: bytes) -> float:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    elapsed = time.perf_counter() - start
    assert all("class" in row for row in answer["predictions"]), answer
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0",
                        choices=["efficientnet_lite0", "mobilenet_v3_small", "efficientnet_b0"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--photo-size", type=int, default=480, help="width of the JPEGs sent (default 480 px)")
    parser.add_argument("--seconds", type=float, default=60.0, help="timed seconds per case, at most (default 60)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per case, at most (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and server logs")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from harv_train.tracking.pyfunc_model import RUNTIME_ENV, log_image_classifier

    with bench_workdir("harv-train-serving-", args.keep) as work:
        uri = f"sqlite:///{work / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = client.create_experiment("bench", artifact_location=(work / "mlruns").as_uri())
        started = time.perf_counter()
        with mlflow.start_run(experiment_id=experiment):
            info = log_image_classifier(bench_state(args.model, args.img_size))
        log_s = time.perf_counter() - started
        client.create_registered_model("bench")
        version = client.create_model_version("bench", info.model_uri, model_id=info.model_id)
        client.set_registered_model_alias("bench", "champion", version.version)

        images = photos(args.photo_size)
        bodies = {b: json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images[:b]]}}).encode()
                  for b in BATCHES}
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri,
               "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
        with ExitStack() as stack:
            urls = {}
            for runtime in RUNTIMES:
                port = free_port()
                cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion", "--env-manager",
                       "local", "--host", "127.0.0.1", "--port", str(port)]
                urls[runtime] = f"http://127.0.0.1:{port}"
                stack.enter_context(running_server(f"serve {runtime}", cmd, f"{urls[runtime]}/ping",
                                                   work / f"serve-{runtime}.log", env={**env, RUNTIME_ENV: runtime}))
            cases = [(r, b) for b in BATCHES for r in RUNTIMES]
            for runtime, batch in cases:  # warm-up: first requests load kernels and allocate
                for _ in range(3):
                    post(urls[runtime], bodies[batch])
            times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
            deadline = time.perf_counter() + args.seconds * len(cases)
            load_before = os.getloadavg()
            while min(len(t) for t in times.values()) < args.requests and time.perf_counter() < deadline:
                for case in cases:
                    times[case].append(post(urls[case[0]], bodies[case[1]]))
            load_after = os.getloadavg()

    rows = []
    for (runtime, batch), t in times.items():
        mean = statistics.mean(t)
        rows.append({"runtime": runtime, "batch": batch, "requests": len(t), "requests_per_s": round(1 / mean, 2),
                     "images_per_s": round(batch / mean, 1), "p50_ms": round(1000 * percentile(t, 0.5), 1),
                     "p95_ms": round(1000 * percentile(t, 0.95), 1)})
    from harv_train.reporting.export import cpu_name

    env_info = {"model": args.model, "img_size": args.img_size,
                "photo": f"{args.photo_size}x{args.photo_size * 3 // 4} JPEG", "cpu": cpu_name(),
                "cores": os.cpu_count(), "load_avg_1m": [round(load_before[0], 1), round(load_after[0], 1)],
                "python": platform.python_version(), "log_model_s": round(log_s, 2)}
    print(f"\n{args.model} at {args.img_size} px, {env_info['photo']} photos, one client, one uvicorn worker; "
          f"{env_info['cpu']}, {env_info['cores']} cores, load {env_info['load_avg_1m'][0]}-"
          f"{env_info['load_avg_1m'][1]}\n")
    print("| runtime | batch | requests/s | images/s | p50 | p95 | requests |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["batch"], r["runtime"])):
        print(f"| {r['runtime']} | {r['batch']} | {r['requests_per_s']} | {r['images_per_s']} | {r['p50_ms']} ms "
              f"| {r['p95_ms']} ms | {r['requests']} |")
    print(json.dumps({"environment": env_info, "results": rows}))


if __name__ == "__main__":
    main()
