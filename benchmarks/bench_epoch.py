"""Per-epoch speed: the plain PyTorch loop vs harv-train's trainer vs the compute floor.

    .venv/bin/python benchmarks/bench_epoch.py                     # 500 train / 200 val, mobilenet_v3_small
    .venv/bin/python benchmarks/bench_epoch.py --model efficientnet_lite0 --epochs 2
    .venv/bin/python benchmarks/bench_epoch.py --data DIR          # your own ImageFolder instead

All three run in this process with the same settings (model, img_size, batch size, freeze ratio,
seed, threads), alternating epoch by epoch so that a noisy neighbour slows all of them alike:
- plain: ImageFolder + the seed's PIL transforms decoded every epoch, NCHW, a DataLoader with
  `--workers` processes, Adam over the trainable parameters, `model.train()` on the whole model;
  validation with a DataLoader and resize + normalize.
- ours: `TrainingSession.train_epoch` as the flow runs it (the checkpoint commit included).
- floor: forward + backward + Adam step (the trainer's fused Adam) of the same network as the trainer runs it (channels_last,
  frozen prefix outside autograd with its BatchNorm folded) over ready-made tensors, as many images
  as one training epoch: what no data pipeline can beat. The same without the folding is reported
  as the unfused floor (the network as the plain loop defines it, run outside autograd).
Prints per-epoch seconds, images/s, final val accuracies, the ratios, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from harv_train.config import load_config  # noqa: E402
from harv_train.core.freezing import (  # noqa: E402
    forward_from,
    freeze_early_blocks,
    frozen_block_count,
    frozen_features,
    fused_frozen_prefix,
    set_train_mode,
)
from harv_train.core.models import build_model, model_spec  # noqa: E402
from harv_train.core.run_state import build_optimizer  # noqa: E402
from harv_train.core.runtime import configure_threads  # noqa: E402
from harv_train.core.session import TrainingSession  # noqa: E402

from bench_workdir import bench_workdir  # noqa: E402


def write_benchmark_dataset(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """Photo-like JPEGs (random 200-400 px crops of scikit-image's sample photos), two classes by source."""
    import skimage.data as sk

    sources = {
        "ProfA": [sk.astronaut(), sk.chelsea(), sk.coffee()],
        "Room1": [sk.rocket(), np.stack([sk.brick()] * 3, -1), np.stack([sk.grass()] * 3, -1)],
    }
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, photos in sources.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                photo = photos[rng.integers(len(photos))]
                h, w = photo.shape[:2]
                size = int(rng.integers(min(200, h, w) // 2, min(400, h, w)))
                y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
                crop = Image.fromarray(photo[y : y + size, x : x + size]).resize((size + 80, size + 80))
                crop.save(folder / f"{i:04d}.jpg", quality=90)
    return root


class PlainLoop:
    """The hand-written reference loop."""

    def __init__(self, cfg, classes, workers: int):
        spec = model_spec(cfg.model_name)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model_name, len(classes), cfg.pretrained, cfg.weights_path)
        freeze_early_blocks(self.model, frozen_block_count(self.model, cfg.freeze_ratio))
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=cfg.lr, weight_decay=cfg.weight_decay)
        size = (cfg.img_size, cfg.img_size)
        train_tf = transforms.Compose([
            transforms.Resize(size), transforms.RandomHorizontalFlip(0.5), transforms.RandomRotation(10),
            transforms.ColorJitter(0.2, 0.2, 0.2), transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
        ])
        val_tf = transforms.Compose([transforms.Resize(size), transforms.ToTensor(),
                                     transforms.Normalize(spec.mean, spec.std)])
        root = Path(cfg.data_dir)
        g = torch.Generator().manual_seed(cfg.seed)
        self.train = torch.utils.data.DataLoader(datasets.ImageFolder(root / "train", train_tf), cfg.batch_size,
                                                 shuffle=True, num_workers=workers, generator=g,
                                                 persistent_workers=workers > 0)
        self.val = torch.utils.data.DataLoader(datasets.ImageFolder(root / "val", val_tf), cfg.batch_size,
                                               num_workers=workers, persistent_workers=workers > 0)

    def epoch(self) -> tuple[float, float, float]:
        criterion = nn.CrossEntropyLoss()
        start = time.perf_counter()
        self.model.train()
        for x, y in self.train:
            loss = criterion(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        self.model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in self.val:
                correct += int((self.model(x).argmax(1) == y).sum())
                seen += len(y)
        return train_s, time.perf_counter() - start, correct / seen


class ComputeFloor:
    """Forward + backward + step of the network over ready-made tensors: channels_last, the frozen
    blocks outside autograd, and (`fused`) with their BatchNorm folded as the trainer runs them."""

    def __init__(self, cfg, classes, n_images: int, fused: bool):
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model_name, len(classes), cfg.pretrained, cfg.weights_path)
        self.n_frozen = frozen_block_count(self.model, cfg.freeze_ratio)
        freeze_early_blocks(self.model, self.n_frozen)
        self.model.to(memory_format=torch.channels_last)
        self.prefix = fused_frozen_prefix(self.model, self.n_frozen) if fused and self.n_frozen else None
        self.optimizer = build_optimizer(cfg, self.model)  # the run's own: same update, same kernel
        self.batches = [
            (torch.randn(min(cfg.batch_size, n_images - i), 3, cfg.img_size, cfg.img_size)
             .contiguous(memory_format=torch.channels_last),
             torch.randint(0, len(classes), (min(cfg.batch_size, n_images - i),)))
            for i in range(0, n_images, cfg.batch_size)
        ]

    def epoch(self) -> float:
        criterion = nn.CrossEntropyLoss()
        start = time.perf_counter()
        set_train_mode(self.model, self.n_frozen)
        for x, y in self.batches:
            h = frozen_features(self.model, self.n_frozen, x, self.prefix)
            loss = criterion(forward_from(self.model, self.n_frozen, h), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an ImageFolder with train/ and val/ (default: write one)")
    parser.add_argument("--train-images", type=int, default=500)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                        help="ImageNet weights (default: yes for efficientnet_lite0, which has them offline)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (data, runs) for a look")
    args = parser.parse_args(argv)
    with bench_workdir("harv-bench-", args.keep) as work:
        return _measure(args, work)


def _measure(args: argparse.Namespace, work: Path) -> dict:
    data = Path(args.data) if args.data else write_benchmark_dataset(work / "data", args.train_images, args.val_images)
    pretrained = args.pretrained if args.pretrained is not None else args.model == "efficientnet_lite0"
    cfg = load_config(None, {
        "model_name": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
        "epochs": args.epochs, "pretrained": pretrained, "classes": None, "data_dir": str(data),
        "artifacts_dir": str(work / "artifacts"), "early_stopping_patience": 0,
    })
    threads = configure_threads(cfg.threads)

    session = TrainingSession(cfg)
    start = time.perf_counter()
    splits = session.splits()
    decode_s = time.perf_counter() - start
    classes = splits["train"].classes
    n_train, n_val = len(splits["train"]), len(splits["val"])
    session.start(None)
    plain = PlainLoop(cfg, classes, args.workers)
    floor = ComputeFloor(cfg, classes, n_train, fused=True)
    plain_floor = ComputeFloor(cfg, classes, n_train, fused=False)

    rows = []
    for epoch in range(args.epochs):
        p_train, p_val, p_acc = plain.epoch()
        start = time.perf_counter()
        ours = session.train_epoch(epoch, progress=False).to_dict()
        ours_wall = time.perf_counter() - start  # train + val + checkpoint commit
        f = floor.epoch()
        f_plain = plain_floor.epoch()
        rows.append({"plain_train_s": p_train, "plain_val_s": p_val, "plain_val_acc": p_acc,
                     "ours_train_s": ours["train_time_s"], "ours_val_s": ours["val_time_s"],
                     "ours_other_s": ours_wall - ours["train_time_s"] - ours["val_time_s"],
                     "ours_val_acc": ours["val_acc"], "floor_s": f, "unfused_floor_s": f_plain})
        print(f"epoch {epoch + 1}: plain {p_train:.2f}+{p_val:.2f}s  ours {ours['train_time_s']:.2f}+"
              f"{ours['val_time_s']:.2f}+{rows[-1]['ours_other_s']:.2f}s (train+val+checkpoints)  floor {f:.2f}s (unfused {f_plain:.2f}s)  "
              f"val acc plain {p_acc:.3f} ours {ours['val_acc']:.3f}", flush=True)

    # The first epoch of the plain loop also starts its workers; the median is the steady state.
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    plain_epoch = med["plain_train_s"] + med["plain_val_s"]
    ours_epoch = med["ours_train_s"] + med["ours_val_s"] + med["ours_other_s"]
    summary = {
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
        "train_images": n_train, "val_images": n_val, "epochs": args.epochs, "threads": threads,
        "decode_once_s": round(decode_s, 2),
        "plain_epoch_s": round(plain_epoch, 2), "ours_epoch_s": round(ours_epoch, 2), "floor_s": round(med["floor_s"], 2),
        "ours_checkpoint_s": round(med["ours_other_s"], 2), "unfused_floor_s": round(med["unfused_floor_s"], 2),
        "plain_train_img_s": round(n_train / med["plain_train_s"], 1),
        "ours_train_img_s": round(n_train / med["ours_train_s"], 1),
        "floor_img_s": round(n_train / med["floor_s"], 1),
        "speedup_vs_plain": round(plain_epoch / ours_epoch, 2),
        "ours_vs_floor": round(ours_epoch / med["floor_s"], 2),
        "plain_final_val_acc": rows[-1]["plain_val_acc"], "ours_final_val_acc": rows[-1]["ours_val_acc"],
    }
    print(f"per epoch (median of {args.epochs}): plain {plain_epoch:.2f}s, ours {ours_epoch:.2f}s, "
          f"floor {med['floor_s']:.2f}s; ours is {summary['speedup_vs_plain']}x the plain loop and "
          f"{summary['ours_vs_floor']}x the floor; decoding once took {decode_s:.2f}s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
