"""The dataset on disk: ImageFolder trees, validated, decoded once and served in batches.

`DATA_DIR/train/<class>/*` and `DATA_DIR/val/<class>/*`. Every image is decoded and resized to
`img_size` x `img_size` once (PIL, the model's pretraining filter) into the decoded-image cache on
disk (harv_train/core/decoded_cache.py), which later epochs, runs, retries and resumes reuse. A split
whose pixels fit in `cache_max_mb` is then held in memory; a larger one is read from the cache file
batch by batch, so memory stays bounded whatever the number of images. Either way the batches are
identical uint8 tensors; the random augmentation runs on them afterwards (harv_train/core/augment.py).
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from harv_train.core.decoded_cache import CacheStore, PixelFile, resolve_cache_dir
from harv_train.core.splits import make_splits
from harv_train.errors import DataError

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("test",)  # evaluated after training when present, never used to choose
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass
class SplitIndex:
    """One split's files: (path, class index) pairs in a stable order."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    # Symlinked class folders count: is_dir() follows links.
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_split(split_dir: Path, classes: Sequence[str]) -> SplitIndex:
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and _is_image_file(p)
        ) if class_dir.is_dir() else []
        if not files:
            raise DataError(
                f"class folder {class_dir} has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...): "
                "add images or remove the folder"
            )
        samples.extend((f, label) for f in files)
    return SplitIndex(split_dir, list(classes), samples)


def _differ(a: Sequence[str], b: Sequence[str], a_name: str, b_name: str) -> str:
    parts = []
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if only_a:
        parts.append(f"only in {a_name}: {', '.join(only_a)}")
    if only_b:
        parts.append(f"only in {b_name}: {', '.join(only_b)}")
    return "; ".join(parts)


def require_data_dir(data_dir: str | Path) -> Path:
    """The data folder, or the one-line error of a missing one (checked before a run writes anything)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data_dir {root} does not exist: put images in {root}/train/<class>/ and {root}/val/<class>/ "
            "or set data_dir (python -m harv_train.demo_data DIR writes an example)"
        )
    return root


def scan_dataset(data_dir: str | Path, classes: Sequence[str] | None = None, val_fraction: float | None = None,
                 test_fraction: float | None = None, seed: int = 0) -> dict[str, SplitIndex]:
    """Check the folder layout and class names; returns the train and val file lists, and test's when
    there is one (`DATA_DIR/test/<class>/`, or `test_fraction`). With `val_fraction`, `data_dir` holds
    the class folders and the splits are made here (harv_train/core/splits.py)."""
    root = require_data_dir(data_dir)
    if val_fraction is not None:
        return _made_splits(root, classes, val_fraction, test_fraction, seed)
    found: dict[str, list[str]] = {}
    present = [*SPLITS, *(s for s in OPTIONAL_SPLITS if (root / s).is_dir())]
    for split in present:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir} does not exist: data_dir needs train/ and val/ folders with one folder per "
                            "class (or set val_fraction: 0.2 to split a folder of class folders for you)")
        names = _class_dirs(split_dir)
        if not names:
            raise DataError(f"{split_dir} has no class folders: add one folder of images per class")
        found[split] = names
    for split in present[1:]:
        if found["train"] != found[split]:
            raise DataError(
                f"class folders in {root}/{split} differ from {root}/train ("
                + _differ(found["train"], found[split], "train", split)
                + "): give every split the same class folders"
            )
    ordered = _checked_classes(root / "train", found["train"], classes)
    return {split: scan_split(root / split, ordered) for split in present}


def _checked_classes(where: Path, names: list[str], classes: Sequence[str] | None) -> list[str]:
    if len(names) < 2:
        raise DataError(f"{where} has only the class {names[0]}: a classifier needs 2 or more classes")
    if classes is not None and sorted(classes) != names:
        raise DataError(
            f"classes in params ({', '.join(classes)}) do not match the folders in {where} ("
            + _differ(classes, names, "params", "folders")
            + "): fix classes, or set it to null to use the folder names"
        )
    # Class index order is the folders' sorted order (ImageFolder's), whatever order params list.
    return names


def _made_splits(root: Path, classes: Sequence[str] | None, val_fraction: float, test_fraction: float | None,
                 seed: int) -> dict[str, SplitIndex]:
    names = _class_dirs(root)
    if "train" in names and "val" in names:
        raise DataError(f"{root} holds train/ and val/ while val_fraction is set: set val_fraction: null to use "
                        "them, or point data_dir at a folder of class folders")
    if not names:
        raise DataError(f"{root} has no class folders: with val_fraction set, data_dir holds one folder of images "
                        "per class")
    ordered = _checked_classes(root, names, classes)
    everything = scan_split(root, ordered)
    made = make_splits(root, ordered, everything.samples, seed, val_fraction, test_fraction)
    return {name: SplitIndex(root, ordered, samples) for name, samples in made.items()}


# What PIL raises for a file that is not a readable image (DecompressionBombError: over its pixel limit).
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _cannot_read(path: Path, exc: BaseException) -> DataError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"cannot read image {path} ({reason})")


def decode_image(path: Path, size: int, interpolation: str) -> torch.Tensor:
    """An image file -> uint8 tensor [3, size, size]. Grayscale, palette, RGBA and CMYK become RGB."""
    try:
        with warnings.catch_warnings():
            # Up to PIL's hard limit (2 x MAX_IMAGE_PIXELS, ~179 MP) a large image is fine here:
            # a JPEG is decoded at 1/2, 1/4 or 1/8 scale, so a 10000x10000 photo never needs 300 MB.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (size, size))
                if img.mode.startswith("I;16"):  # convert() would clip 0..65535 at 255, not scale it
                    img = Image.fromarray((np.asarray(img, np.float32) / 257).round().astype(np.uint8))
                img = img.convert("RGB").resize((size, size), _FILTERS[interpolation])
    except _UNREADABLE as exc:
        raise _cannot_read(path, exc) from None
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass
class DecodedSplit:
    """A split ready for training: uint8 images in memory, or in the decoded-image cache on disk."""

    classes: list[str]
    paths: list[Path]
    labels: torch.Tensor  # int64 [N]
    images: torch.Tensor | None  # uint8 [N, 3, S, S] when held in memory, else None (read from `pixels`)
    img_size: int
    interpolation: str
    skipped: list[str] = field(default_factory=list)
    pixels: PixelFile | None = None  # the cache file holding every image of the split
    slots: np.ndarray | None = None  # int64 [N]: image i is slot slots[i] of `pixels`
    decoded: int = 0  # images this load decoded (0: all came from the cache)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def cached(self) -> bool:
        """Held in memory (else read from the disk cache per batch)."""
        return self.images is not None

    def subset(self, indices: torch.Tensor) -> DecodedSplit:
        """The images at `indices`, sharing this split's memory or cache file (no copy of pixels on disk)."""
        rows = indices.tolist()
        return DecodedSplit(
            classes=self.classes, paths=[self.paths[i] for i in rows], labels=self.labels[indices],
            images=None if self.images is None else self.images[indices], img_size=self.img_size,
            interpolation=self.interpolation, pixels=self.pixels,
            slots=None if self.slots is None else self.slots[indices.numpy()],
        )

    def batches(
        self, order: torch.Tensor, batch_size: int, num_workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in `order`, `batch_size` at a time (the last batch may be short)."""
        return self.batches_of([order[i : i + batch_size] for i in range(0, len(order), batch_size)], num_workers)

    def batches_of(
        self, chunks: list[torch.Tensor], num_workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) for each tensor of indices in `chunks`.

        `num_workers` is ignored: no batch is decoded any more, its pixels come from memory or from
        the cache file."""
        if self.images is not None:
            on_cpu = self.images.device.type == "cpu"
            for idx in chunks:
                # numpy's take copies whole rows: 15x faster than torch's indexing of a uint8 [N, 3, S, S]
                images = (torch.from_numpy(self.images.numpy().take(idx.numpy(), axis=0)) if on_cpu
                          else self.images[idx])
                yield images, self.labels[idx]
            return
        slots = [self.slots[idx.cpu().numpy()] for idx in chunks]
        for k, idx in enumerate(chunks):
            if k + 1 < len(slots):  # the kernel reads the next batch from disk while this one trains
                self.pixels.prefetch(slots[k + 1])
            yield torch.from_numpy(self.pixels.read(slots[k])), self.labels[idx]


def _drop_inherited_exit_hooks(worker_id: int) -> None:
    """In each DataLoader worker, first thing: forget the thread-exit hooks copied from the parent.

    A worker is a fork, and multiprocessing runs the hooks registered with threading's
    `_register_atexit` when it ends. Those are the parent's, for threads the worker does not have:
    Prefect's log and event services (started by a flow run's first log line) register one that
    fails in a fork (AssertionError), which ended every worker with exit code 1, silently, and the
    DataLoader then raised "worker exited unexpectedly"."""
    hooks = getattr(threading, "_threading_atexits", None)
    if hooks is not None:
        hooks.clear()


def _unreadable_error(unreadable: list[DataError], root: Path, fix: str) -> DataError:
    """One error for them all: the first named, the rest counted."""
    more = f" and {len(unreadable) - 1} more unreadable image(s) in {root}" if len(unreadable) > 1 else ""
    return DataError(f"{unreadable[0]}{more}: {fix}")


def check_images_open(index: SplitIndex, fix: str = "remove or replace the file, or set skip_bad_images: true") -> None:
    """Every file opens as an image (its header is read, its pixels are not): a quick look for empty,
    mislabelled or garbage files before a run starts. Decoding, later, still catches a truncated one."""
    unreadable: list[DataError] = []
    for path, _ in index.samples:
        try:
            with warnings.catch_warnings():  # as in decode_image: a large image is fine up to PIL's hard limit
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path):
                    pass
        except _UNREADABLE as exc:
            unreadable.append(_cannot_read(path, exc))
    if unreadable:
        raise _unreadable_error(unreadable, index.root, fix)


def decode_split(
    index: SplitIndex,
    img_size: int,
    interpolation: str,
    cache_max_mb: int,
    skip_bad_images: bool = False,
    fix: str = "remove or replace the file, or set skip_bad_images: true",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> DecodedSplit:
    """Every image decoded once into the disk cache in `cache_dir` (None: the user's cache folder) by
    `num_workers` processes, which also proves each one readable; the split is then held in memory
    when it fits in `cache_max_mb`, else read from the cache per batch.
    An unreadable image is an error that ends with `fix`, or skipped and logged."""
    store = CacheStore(resolve_cache_dir(cache_dir), index.root, img_size, interpolation)
    found = store.ensure([path for path, _ in index.samples], num_workers)
    keep: list[int] = []
    skipped: list[str] = []
    unreadable: list[DataError] = []
    for pos, (path, _) in enumerate(index.samples):
        exc = found.errors.get(pos)
        if exc is None:
            keep.append(pos)
        elif not skip_bad_images:
            unreadable.append(exc)  # all of them in one message, not one per attempt
        else:
            logger.warning(f"skipping unreadable image: {exc}")
            skipped.append(str(path))
    if unreadable:
        raise _unreadable_error(unreadable, index.root, fix)
    labels = torch.tensor([index.samples[pos][1] for pos in keep], dtype=torch.int64)
    present = set(labels.tolist())
    for label, name in enumerate(index.classes):
        if label not in present:
            raise DataError(f"class {name} in {index.root} has no readable images: add images to {index.root / name}")
    slots = found.slots[keep]
    fits = len(keep) * 3 * img_size * img_size <= cache_max_mb * 2**20
    return DecodedSplit(
        classes=list(index.classes),
        paths=[index.samples[pos][0] for pos in keep],
        labels=labels,
        images=torch.from_numpy(found.pixels.read(slots)) if fits else None,
        img_size=img_size,
        interpolation=interpolation,
        skipped=skipped,
        pixels=found.pixels,
        slots=slots,
        decoded=found.decoded,
    )


def load_dataset(
    data_dir: str | Path,
    classes: Sequence[str] | None,
    img_size: int,
    interpolation: str,
    cache_max_mb: int,
    skip_bad_images: bool = False,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
) -> dict[str, DecodedSplit]:
    """Scan, validate and decode every split (see `decode_split`): train, val and test when there is one."""
    indexes = scan_dataset(data_dir, classes, val_fraction, test_fraction, seed)
    return decode_splits(indexes, img_size, interpolation, cache_max_mb, skip_bad_images, cache_dir, num_workers)


def decode_splits(indexes: dict[str, SplitIndex], img_size: int, interpolation: str, cache_max_mb: int,
                  skip_bad_images: bool = False, cache_dir: str | Path | None = None,
                  num_workers: int = 0) -> dict[str, DecodedSplit]:
    """Decode each split; splits made from one folder are decoded together (one cache of that folder,
    which a split decoded alone would prune of the others' images) and then divided."""
    by_root: dict[Path, list[str]] = {}
    for name, index in indexes.items():
        by_root.setdefault(index.root, []).append(name)
    out: dict[str, DecodedSplit] = {}
    for root, names in by_root.items():
        if len(names) == 1:
            out[names[0]] = decode_split(indexes[names[0]], img_size, interpolation, cache_max_mb, skip_bad_images,
                                         cache_dir=cache_dir, num_workers=num_workers)
            continue
        union = SplitIndex(root, indexes[names[0]].classes, [s for n in names for s in indexes[n].samples])
        whole = decode_split(union, img_size, interpolation, cache_max_mb, skip_bad_images,
                             cache_dir=cache_dir, num_workers=num_workers)
        row_of = {path: row for row, path in enumerate(whole.paths)}
        skipped = set(whole.skipped)
        for n in names:
            rows = torch.tensor([row_of[p] for p, _ in indexes[n].samples if p in row_of], dtype=torch.int64)
            part = whole.subset(rows)
            part.skipped = [str(p) for p, _ in indexes[n].samples if str(p) in skipped]
            part.decoded = whole.decoded if n == names[0] else 0  # counted once
            out[n] = part
    return {name: out[name] for name in indexes}
