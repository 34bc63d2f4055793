"""Data beyond memory: per-image cost, peak memory and decode speed from 500 to 100,000 images.

    .venv/bin/python benchmarks/bench_data.py                          # 500, 5000, 20000, 100000 train images
    .venv/bin/python benchmarks/bench_data.py --sizes 500 5000         # a quicker look
    .venv/bin/python benchmarks/bench_data.py --keep                   # keep the JPEGs and caches for a look

mobilenet_v3_small at 224 px (random init: no network needed), batch 16, 2 classes, 200 val images,
the default config otherwise (num_workers 2, cache_max_mb 2048, threads: every core). Each measured
party runs in a process of its own (so its peak RSS is its own) that takes orders epoch by epoch:
- ours: the first `session.splits()` builds the decoded-image cache (the cold decode); then epochs
  through `TrainingSession.train_epoch`, as the flow runs them (checkpoint commit included). A full
  epoch over 100,000 images takes many minutes on 2 cores, so each epoch trains on `--sample-batches`
  batches drawn uniformly at random from the whole split (a new draw every epoch, so they read all
  over the cache file) and validates on all 200 val images. Per-image epoch cost = train seconds /
  sampled images + (val + checkpoint seconds) / N: what a full epoch costs per image. Epoch 1 is
  cold (it also computes the frozen val features).
- the baseline: ours at the smallest size, kept running through the whole benchmark; it trains an
  epoch right before each epoch of every other size, so a ratio to it compares two epochs run
  back to back under the same load (the machine is shared). `warm_vs_smallest` is the median of
  those per-round ratios over the warm epochs.
- plain: the plain PyTorch loop of bench_epoch.py (ImageFolder, PIL transforms every epoch,
  DataLoader with 2 workers) on the same images, sampled the same way, an epoch after each of ours.
- the first decode pass alone: our cache build, in images/s, against a plain DataLoader (2 workers)
  that decodes and resizes with PIL (Resize((224, 224)) + ToTensor) the first `--decode-sample` images.
- `--drop-page-cache`: two more epochs of ours, each after evicting the cache file from the kernel's
  page cache (posix_fadvise DONTNEED): the cost where the file does not fit in free RAM.
- `--compile-study`: at the smallest size, ours with compile: true, twice (inductor's disk cache
  cold, then warm), alternating with the eager baseline: compile time, speed-up, break-even.
- peak RSS of each process (ru_maxrss) and of its worker processes.
The source JPEGs are 256-320 px photo-like crops (bench_epoch.py's kind, smaller so that 100,000 fit
in 2 GB); each size is a folder of hard links to the first N of them. Each size's cache is removed
after it is measured; everything is removed at the end unless --keep. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_workdir import bench_workdir  # noqa: E402

CLASSES = ("ProfA", "Room1")
JPEG_BYTES = 30_000  # about, for the disk check


# -- the source images ----------------------------------------------------------------------------------


def _photos():
    import skimage.data as sk

    return {
        "ProfA": [sk.astronaut(), sk.chelsea(), sk.coffee()],
        "Room1": [sk.rocket(), np.stack([sk.brick()] * 3, -1), np.stack([sk.grass()] * 3, -1)],
    }


def _write_range(args: tuple[str, str, int, int, int]) -> None:
    from PIL import Image

    folder, name, start, stop, seed = args
    photos = _photos()[name]
    for i in range(start, stop):
        rng = np.random.default_rng([seed, CLASSES.index(name), i])
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        size = int(rng.integers(min(200, h, w) // 2, min(400, h, w)))
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        out = int(rng.integers(256, 321))
        crop = Image.fromarray(photo[y : y + size, x : x + size]).resize((out, out))
        crop.save(Path(folder) / f"{i:06d}.jpg", quality=90)


def write_pool(root: Path, n_train: int, n_val: int, processes: int = 2) -> Path:
    """root/{train,val}/<class>/NNNNNN.jpg, written by `processes` processes."""
    jobs = []
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            per_class = n // 2
            step = 2000
            jobs += [(str(folder), name, s, min(s + step, per_class), seed) for s in range(0, per_class, step)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_write_range, jobs, chunksize=1)
    return root


def link_set(pool: Path, root: Path, n_train: int) -> Path:
    """A dataset of the pool's first n_train train images (half per class) and all its val images."""
    for split in ("train", "val"):
        for name in CLASSES:
            src = pool / split / name
            dst = root / split / name
            dst.mkdir(parents=True)
            files = sorted(src.iterdir())
            for f in files[: n_train // 2] if split == "train" else files:
                os.link(f, dst / f.name)
    return root


# -- the measured parties, each in a process of its own ----------------------------------------------------


def _rss() -> dict:
    mib = 1024  # ru_maxrss is in KiB on Linux
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib),
            "workers_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / mib)}


def _sample(n: int, batches: int, batch_size: int, epoch: int):
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
    return order[: batches * batch_size] if batches * batch_size < n else order


class Ours:
    """TrainingSession epochs on a random sample of the split; the cold decode at setup."""

    def __init__(self, data: Path, cache: Path, work: Path, args):
        from harv_train.config import load_config
        from harv_train.core.runtime import configure_threads
        from harv_train.core.session import TrainingSession

        cfg = load_config(None, {
            "model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 224, "batch_size": 16,
            "classes": None, "data_dir": str(data), "artifacts_dir": str(work / "artifacts"), "cache_dir": str(cache),
            "epochs": 10_000, "early_stopping_patience": 0, "cache_max_mb": args.cache_max_mb, "compile": args.compile,
        })
        self.threads = configure_threads(cfg.threads)
        self.cache, self.args = cache, args
        self.session = TrainingSession(cfg)
        self.epoch = 0

    def setup(self) -> dict:
        start = time.perf_counter()
        self.splits = self.session.splits()
        decode_s = time.perf_counter() - start
        self.full, self.val = self.splits["train"], self.splits["val"]
        self.session.start(None)
        n = len(self.full)
        return {"train_images": n, "val_images": len(self.val), "threads": self.threads,
                "held_in_memory": self.full.cached, "decode_s": decode_s,
                "decode_img_s": (n + len(self.val)) / decode_s,
                "cache_bytes": sum(f.stat().st_size for f in self.cache.rglob("*") if f.is_file())}

    def read(self, drop_page_cache: bool = False) -> dict:
        """The data path alone: `sample_batches` random batches read as an epoch reads them, no training."""
        import torch

        if drop_page_cache and self.full.pixels is not None:
            os.posix_fadvise(self.full.pixels._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        sample = _sample(len(self.full), self.args.sample_batches, 16, 10_000 + self.epoch)
        chunks = list(sample.split(16))
        start = time.perf_counter()
        for images, _ in self.full.batches_of(chunks):
            pass
        seconds = time.perf_counter() - start
        return {"read_ms_per_image": 1000 * seconds / len(sample), "dropped_page_cache": drop_page_cache}

    def run_epoch(self, drop_page_cache: bool = False) -> dict:
        n = len(self.full)
        if drop_page_cache and self.full.pixels is not None:  # evicted: this epoch reads the file from disk
            os.posix_fadvise(self.full.pixels._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        sample = _sample(n, self.args.sample_batches, 16, self.epoch)
        self.splits["train"] = self.full.subset(sample)  # this epoch's draw, in the session's own dict of splits
        start = time.perf_counter()
        m = self.session.train_epoch(self.epoch, progress=False)
        wall = time.perf_counter() - start
        self.epoch += 1
        other = wall - m.train_time_s - m.val_time_s
        return {"train_s": m.train_time_s, "val_s": m.val_time_s, "other_s": other, "images": len(sample),
                "per_image_ms": 1000 * (m.train_time_s / len(sample) + (m.val_time_s + other) / n),
                "dropped_page_cache": drop_page_cache}


class Plain:
    """bench_epoch.py's plain loop on a random sample of the split; the plain decode pass at setup."""

    def __init__(self, data: Path, args):
        from harv_train.config import load_config
        from harv_train.core.runtime import configure_threads

        self.cfg = load_config(None, {"model_name": "mobilenet_v3_small", "pretrained": False, "img_size": 224,
                                      "batch_size": 16, "classes": None, "data_dir": str(data)})
        configure_threads(self.cfg.threads)
        self.data, self.args = data, args

    def setup(self) -> dict:
        import torch
        from torchvision import datasets, transforms

        from bench_epoch import PlainLoop

        folder = datasets.ImageFolder(self.data / "train",
                                      transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()]))
        count = min(len(folder), self.args.decode_sample)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(folder, range(count)), batch_size=16, num_workers=2)
        start = time.perf_counter()
        for _ in loader:
            pass
        decode_img_s = count / (time.perf_counter() - start)
        self.loop = PlainLoop(self.cfg, list(CLASSES), workers=2)
        return {"plain_decode_img_s": decode_img_s, "plain_decode_images": count}

    def run_epoch(self, drop_page_cache: bool = False) -> dict:
        import torch
        from torch import nn

        plain, n = self.loop, len(self.loop.train.dataset)
        batches = self.args.sample_batches if self.args.sample_batches * 16 < n else None
        criterion = nn.CrossEntropyLoss()
        start = time.perf_counter()
        plain.model.train()
        for i, (x, y) in enumerate(plain.train):
            loss = criterion(plain.model(x), y)
            plain.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            plain.optimizer.step()
            if batches is not None and i + 1 == batches:
                break
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        plain.model.eval()
        with torch.no_grad():
            for x, _ in plain.val:
                plain.model(x)
        val_s = time.perf_counter() - start
        images = batches * 16 if batches else n
        return {"train_s": train_s, "val_s": val_s, "images": images, "per_image_ms": 1000 * (train_s / images + val_s / n)}


def serve(party) -> None:
    """In a child: the setup's result, then one result per order read from stdin ("epoch", "epoch drop", "done")."""
    def reply(result: dict) -> None:
        print("@@ " + json.dumps(result), flush=True)

    reply(party.setup())
    for line in sys.stdin:
        order = line.split()
        if order[0] == "done":
            reply(_rss())
            return
        if order[0] == "read":
            reply(party.read(drop_page_cache="drop" in order))
            continue
        reply(party.run_epoch(drop_page_cache="drop" in order))


class Child:
    """A measured party in its own process, driven order by order."""

    def __init__(self, label: str, kind: str, data: Path, cache: Path, work: Path, args, compile: bool = False):
        cmd = [sys.executable, __file__, "--_serve", kind, "--_data", str(data), "--_cache", str(cache),
               "--_work", str(work), "--sample-batches", str(args.sample_batches),
               "--decode-sample", str(args.decode_sample), "--cache-max-mb", str(args.cache_max_mb)]
        cmd += ["--compile"] if compile else []
        self.label = label
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.setup = self._answer()
        self.epochs: list[dict] = []

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
            print(f"    [{self.label}] {line.rstrip()}", flush=True)
        raise SystemExit(f"{self.label} ended without an answer (exit {self.proc.wait()})")

    def epoch(self, drop: bool = False) -> dict:
        self.proc.stdin.write("epoch drop\n" if drop else "epoch\n")
        row = self._answer()
        self.epochs.append(row)
        extra = f", val {row['val_s']:.2f}s" + (" (page cache dropped)" if drop else "")
        print(f"  {self.label}: epoch {len(self.epochs)}: train {row['train_s']:.2f}s on {row['images']} images"
              f"{extra} -> {row['per_image_ms']:.2f} ms/image", flush=True)
        return row

    def read(self, drop: bool = False) -> float:
        self.proc.stdin.write("read drop\n" if drop else "read\n")
        ms = self._answer()["read_ms_per_image"]
        print(f"  {self.label}: reading {'from disk' if drop else 'as cached'}: {ms:.3f} ms/image", flush=True)
        return ms

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        rss = self._answer()
        self.proc.wait()
        return rss


# -- the driver -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000, 20000, 100000])
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--sample-batches", type=int, default=32, help="training batches per measured epoch")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per size (the first is cold)")
    parser.add_argument("--decode-sample", type=int, default=2000, help="images of the plain decode pass")
    parser.add_argument("--cache-max-mb", type=int, default=2048, help="as the param (default: the default)")
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="two more epochs per size with the cache file evicted from the page cache")
    parser.add_argument("--compile-study", action="store_true",
                        help="at the smallest size, also compile: true, twice (inductor's cache cold, then warm)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--pool", help="source JPEGs written by an earlier run (--keep), reused and left in place")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (images, caches)")
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--_serve", "--_data", "--_cache", "--_work"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._serve:  # a child
        data, cache, work = Path(args._data), Path(args._cache), Path(args._work)
        serve(Ours(data, cache, work, args) if args._serve == "ours" else Plain(data, args))
        return {}
    with bench_workdir("harv-bench-data-", args.keep) as work:
        return _run(args, work)


def _run(args, work: Path) -> dict:
    sizes = sorted(args.sizes)
    largest = sizes[-1]
    needed = (largest + args.val_images) * ((0 if args.pool else JPEG_BYTES) + 3 * 224 * 224) + sizes[0] * 3 * 224 * 224
    free = shutil.disk_usage(work).free
    print(f"working in {work}: {free / 2**30:.1f} GiB free, about {needed / 2**30:.1f} GiB needed at the peak", flush=True)
    if free < needed * 1.1 + 2 * 2**30:
        raise SystemExit(f"not enough free disk space in {work}: run with smaller --sizes or set TMPDIR")
    start = time.perf_counter()
    pool = Path(args.pool) if args.pool else write_pool(work / "pool", largest, args.val_images)
    print(f"{'using' if args.pool else 'wrote'} {largest + args.val_images} JPEGs in {time.perf_counter() - start:.0f}s "
          f"({sum(f.stat().st_size for f in pool.rglob('*.jpg')) / 2**30:.2f} GiB)", flush=True)

    base_data = link_set(pool, work / f"set-{sizes[0]}", sizes[0])
    print(f"{sizes[0]} training images (the baseline):", flush=True)
    base = Child(f"ours {sizes[0]}", "ours", base_data, work / "cache-base", work / "run-base", args)
    results = []
    for n in sizes:
        results.append(_measure_size(n, base, pool, work, args))
    compile_study = _compile_study(base, base_data, work, args) if args.compile_study else None
    base_rss = base.finish()
    results[0].update(base_rss)
    return _report(results, compile_study, args)


def _measure_size(n: int, base: Child, pool: Path, work: Path, args) -> dict:
    smallest = n == base.setup["train_images"]
    if smallest:
        ours, data = base, work / f"set-{n}"
        print(f"{n} training images:", flush=True)
    else:
        data = link_set(pool, work / f"set-{n}", n)
        print(f"{n} training images:", flush=True)
        ours = Child(f"ours {n}", "ours", data, work / f"cache-{n}", work / f"run-{n}", args)
    plain = None if args.no_plain else Child(f"plain {n}", "plain", data, work / "unused", work, args)
    first = len(ours.epochs)
    ratios, dropped_ratios, base_warm = [], [], []
    for round_ in range(args.epochs + (2 if args.drop_page_cache else 0)):
        drop = round_ >= args.epochs
        base_row = None if smallest else base.epoch()
        row = ours.epoch(drop=drop)
        if plain is not None and not drop:
            plain.epoch()
        if base_row is not None and round_ >= 1:
            (dropped_ratios if drop else ratios).append(row["per_image_ms"] / base_row["per_image_ms"])
            if not drop:
                base_warm.append(base_row["per_image_ms"])
    reads = [ours.read() for _ in range(3)]
    reads_from_disk = [ours.read(drop=True) for _ in range(3)] if args.drop_page_cache else []
    mine = ours.epochs[first:]
    warm = [r["per_image_ms"] for r in mine[1 : args.epochs]]
    dropped = [r["per_image_ms"] for r in mine[args.epochs :]]
    result = {
        **ours.setup,
        "cold_epoch_per_image_ms": mine[0]["per_image_ms"],
        "cold_per_image_ms": 1000 * ours.setup["decode_s"] / n + mine[0]["per_image_ms"],
        "warm_per_image_ms": statistics.median(warm),
        "warm_min_per_image_ms": min(warm),
        "warm_vs_smallest": statistics.median(ratios) if ratios else 1.0,
        "read_ms_per_image": min(reads),
        "read_from_disk_ms_per_image": min(reads_from_disk) if reads_from_disk else None,
        "warm_read_from_disk_per_image_ms": statistics.median(dropped) if dropped else None,
        "read_from_disk_vs_smallest": statistics.median(dropped_ratios) if dropped_ratios else None,
        "epochs": mine,
    }
    if not smallest:
        result["warm_min_vs_smallest_min"] = min(warm) / min(base_warm) if base_warm else None
        result.update(ours.finish())
        shutil.rmtree(work / f"cache-{n}", ignore_errors=True)
        shutil.rmtree(work / f"run-{n}", ignore_errors=True)
        shutil.rmtree(data)
    if plain is not None:
        # Its first epoch also starts the DataLoader's workers: the rest are the steady state.
        plain_warm = [r["per_image_ms"] for r in plain.epochs[1:]] or [plain.epochs[0]["per_image_ms"]]
        result.update(plain.setup)
        result.update({"plain_per_image_ms": statistics.median(plain_warm),
                       **{f"plain_{k}": v for k, v in plain.finish().items()}})
    return result


def _first_epoch_excess_s(epochs: list[dict]) -> float:
    """How much longer the first epoch's training took than a steady one would on as many images."""
    steady = statistics.median(r["train_s"] / r["images"] for r in epochs[1:] if not r["dropped_page_cache"])
    return epochs[0]["train_s"] - steady * epochs[0]["images"]


def _compile_study(base: Child, data: Path, work: Path, args) -> dict:
    """compile: true against the eager baseline: compile time (inductor's disk cache cold, then warm),
    per-image epoch cost, and the images x epochs after which the compile has paid for itself."""
    print("compile: true, inductor's disk cache cold, then warm:", flush=True)
    report = {}
    eager_excess = _first_epoch_excess_s(base.epochs)
    cache = work / "cache-compiled"  # its inductor/ folder is kept from the first run to the second
    shutil.copytree(work / "cache-base" / "decoded", cache / "decoded")
    for i, name in enumerate(("inductor_cache_cold", "inductor_cache_warm")):
        compiled = Child(f"compiled {i + 1}", "ours", data, cache, work / f"run-compiled-{i}", args, compile=True)
        ratios, eager, mine = [], [], []
        for _ in range(args.epochs):
            e = base.epoch()
            c = compiled.epoch()
            eager.append(e["per_image_ms"])
            mine.append(c["per_image_ms"])
            ratios.append(c["per_image_ms"] / e["per_image_ms"])
        compiled.finish()
        compile_s = _first_epoch_excess_s(compiled.epochs) - eager_excess
        eager_ms, compiled_ms = statistics.median(eager[1:]), statistics.median(mine[1:])
        saved_ms = eager_ms - compiled_ms
        report[name] = {
            "compile_s": round(compile_s, 1), "eager_ms_per_image": round(eager_ms, 2),
            "compiled_ms_per_image": round(compiled_ms, 2), "speedup": round(1 / statistics.median(ratios[1:]), 3),
            "break_even_images_x_epochs": round(1000 * compile_s / saved_ms) if saved_ms > 0 else None,
        }
    print(f"compile: {json.dumps(report)}", flush=True)
    return report


def _report(results: list[dict], compile_study: dict | None, args) -> dict:
    table = []
    for r in results:
        line = {
            "train_images": r["train_images"],
            "in_memory": r["held_in_memory"],
            "warm_ms_per_image": round(r["warm_per_image_ms"], 2),
            "warm_vs_smallest": round(r["warm_vs_smallest"], 3),
            "warm_min_ms_per_image": round(r["warm_min_per_image_ms"], 2),
            "warm_min_vs_smallest_min": round(r.get("warm_min_vs_smallest_min") or 1.0, 3),
            "read_ms_per_image": round(r["read_ms_per_image"], 3),
            "cold_ms_per_image": round(r["cold_per_image_ms"], 2),
            "decode_img_s": round(r["decode_img_s"]),
            "peak_rss_mib": r["peak_rss_mib"],
            "decode_workers_peak_rss_mib": r["workers_peak_rss_mib"],
            "cache_gib": round(r["cache_bytes"] / 2**30, 2),
        }
        if r.get("read_from_disk_ms_per_image") is not None:
            line["read_from_disk_ms_per_image"] = round(r["read_from_disk_ms_per_image"], 3)
        if r.get("warm_read_from_disk_per_image_ms") is not None:
            line["from_disk_ms_per_image"] = round(r["warm_read_from_disk_per_image_ms"], 2)
            if r.get("read_from_disk_vs_smallest") is not None:
                line["from_disk_vs_smallest"] = round(r["read_from_disk_vs_smallest"], 3)
        if "plain_per_image_ms" in r:
            line.update({
                "plain_ms_per_image": round(r["plain_per_image_ms"], 2),
                "cold_vs_plain": round(r["cold_per_image_ms"] / r["plain_per_image_ms"], 3),
                "warm_speedup_vs_plain": round(r["plain_per_image_ms"] / r["warm_per_image_ms"], 2),
                "plain_decode_img_s": round(r["plain_decode_img_s"]),
                "decode_vs_plain_decode": round(r["decode_img_s"] / r["plain_decode_img_s"], 2),
                "plain_peak_rss_mib": r["plain_peak_rss_mib"],
            })
        table.append(line)
    keys = list(dict.fromkeys(k for line in table for k in line))
    print()
    print(" | ".join(keys))
    for line in table:
        print(" | ".join(str(line.get(k, "")) for k in keys))
    summary = {"sample_batches": args.sample_batches, "epochs": args.epochs, "cache_max_mb": args.cache_max_mb,
               "rows": table, "details": results}
    if compile_study:
        summary["compile"] = compile_study
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
