"""Augmentation cost per epoch: torchvision.transforms.v2 one image at a time vs harv-train's batched path.

    .venv/bin/python benchmarks/bench_augment.py                  # 500 images, 224 and 64 px
    .venv/bin/python benchmarks/bench_augment.py --images 500 --sizes 224 --reps 7

For each size and policy (`trivial`, `randaugment`, each without and with random_resized_crop 0.35):
- v2: `RandomResizedCrop` (when on), `RandomHorizontalFlip(0.5)`, then `TrivialAugmentWide()` or
  `RandAugment()` on each uint8 image [3, H, W] in turn, then the same batched ToTensor + Normalize
  as ours (harv_train.core.augment.normalize) batch by batch;
- ours: `draw_policy` + `apply_policy` batch by batch (harv_train.core.policies), the draws included;
- seed: the seed policy's `draw_augmentation` + `apply_augmentation`, for reference.
Batches of 16 (the default batch_size), float32 channels_last out, as training makes them. The three
run alternately, rep by rep, so that a noisy neighbour slows them alike; each figure is the median of
the reps, wall and CPU time (the latter steadier on a shared machine; `--threads 1` makes it the whole
cost of the work). Images are photo crops (scikit-image's sample photos) resized to the size. Prints one line
per case and one JSON line with seconds per epoch and the ratios v2 / ours and ours / seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from harv_train.core.augment import apply_augmentation, draw_augmentation, normalize  # noqa: E402
from harv_train.core.policies import apply_policy, draw_policy  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 16
CROP = 0.35


def photo_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n random crops (100-300 px) of scikit-image's colour sample photos, resized to size x size, uint8."""
    import skimage.data as sk

    photos = [torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1) for p in (sk.astronaut(), sk.chelsea(), sk.coffee())]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        side = int(torch.randint(100, 300, (), generator=g))
        top = int(torch.randint(0, p.shape[1] - side, (), generator=g))
        left = int(torch.randint(0, p.shape[2] - side, (), generator=g))
        crop = p[:, top : top + side, left : left + side].float().unsqueeze(0)
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0].round().clamp(0, 255)
    return out


def v2_epoch(images: torch.Tensor, policy: str, crop: float) -> None:
    size = images.shape[-1]
    ops = [v2.RandomResizedCrop(size, scale=(crop, 1.0), antialias=True)] if crop else []
    ops += [v2.RandomHorizontalFlip(0.5), v2.TrivialAugmentWide() if policy == "trivial" else v2.RandAugment()]
    chain = v2.Compose(ops)
    for start in range(0, len(images), BATCH):
        batch = torch.stack([chain(img) for img in images[start : start + BATCH]])
        normalize(batch, MEAN, STD, torch.channels_last)


def ours_epoch(images: torch.Tensor, policy: str, crop: float, generator: torch.Generator) -> None:
    size = tuple(images.shape[-2:])
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        draws = draw_policy(len(batch), generator, policy, size, 0.5, crop)
        apply_policy(batch, draws, MEAN, STD, torch.channels_last)


def seed_epoch(images: torch.Tensor, generator: torch.Generator) -> None:
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        apply_augmentation(batch, draw_augmentation(len(batch), generator), MEAN, STD, torch.channels_last)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared machine the CPU time is the steadier figure;
    with one thread it bounds what the work costs two cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for size in args.sizes:
        images = photo_batch(args.images, size)
        generator = torch.Generator().manual_seed(0)
        cases = [(p, c) for p in ("trivial", "randaugment") for c in (0.0, CROP)]
        times: dict[str, list[tuple[float, float]]] = {"seed": []}
        for policy, crop in cases:
            times[f"v2 {policy} {crop}"], times[f"ours {policy} {crop}"] = [], []
        seed_epoch(images[:BATCH], generator)  # warm-up: first calls allocate
        for _ in range(args.reps):
            times["seed"].append(timed(lambda: seed_epoch(images, generator)))
            for policy, crop in cases:
                times[f"v2 {policy} {crop}"].append(timed(lambda: v2_epoch(images, policy, crop)))
                times[f"ours {policy} {crop}"].append(timed(lambda: ours_epoch(images, policy, crop, generator)))
        def median(key: str, which: int) -> float:
            return statistics.median(t[which] for t in times[key])

        seed, seed_cpu = median("seed", 0), median("seed", 1)
        print(f"{size} px, {args.images} images: seed policy {seed:.3f} s wall, {seed_cpu:.3f} s CPU", flush=True)
        for policy, crop in cases:
            tv, ours = median(f"v2 {policy} {crop}", 0), median(f"ours {policy} {crop}", 0)
            tv_cpu, ours_cpu = median(f"v2 {policy} {crop}", 1), median(f"ours {policy} {crop}", 1)
            print(f"  {policy:<11} crop {crop:<4}: wall v2 per sample {tv:.3f} s, ours {ours:.3f} s; "
                  f"CPU v2 {tv_cpu:.3f} s, ours {ours_cpu:.3f} s; v2/ours {tv_cpu / ours_cpu:.2f}x, "
                  f"ours/seed {ours_cpu / seed_cpu:.2f}x (CPU)", flush=True)
            results.append({"size": size, "policy": policy, "random_resized_crop": crop,
                            "wall_s": {"v2": round(tv, 4), "ours": round(ours, 4), "seed": round(seed, 4)},
                            "cpu_s": {"v2": round(tv_cpu, 4), "ours": round(ours_cpu, 4), "seed": round(seed_cpu, 4)},
                            "v2_over_ours_cpu": round(tv_cpu / ours_cpu, 3),
                            "ours_over_seed_cpu": round(ours_cpu / seed_cpu, 3)})
    print(json.dumps({"images": args.images, "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0],
                      "results": results}))


if __name__ == "__main__":
    main()
