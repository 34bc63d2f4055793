"""Train, val and test splits made from one folder of class folders (`val_fraction`, `test_fraction`).

Stratified: each class is split on its own, so every split holds every class in about the same
proportion. Stable: each file gets a number in [0, 1) from a SHA-256 hash of the seed and its path
relative to `data_dir`; within a class the files with the lowest numbers go to test, the next to
val, the rest to train, in the counts the fractions ask for (rounded, at least one per split). The
same files and seed give the same split on any machine; adding images moves an existing image only
when a new one takes its place next to a boundary (m new images move at most m existing ones per
boundary), instead of reshuffling everything as a random permutation would.
"""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path
from typing import Sequence

from harv_train.errors import DataError

MADE_SPLITS = ("train", "val", "test")


def stable_unit(seed: int, relative_path: str) -> float:
    """A number in [0, 1) fixed by the seed and the path alone (POSIX separators on every system)."""
    digest = hashlib.sha256(f"{seed}\0{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_counts(n: int, val_fraction: float, test_fraction: float | None) -> tuple[int, int, int]:
    """(train, val, test) image counts of a class of `n` images; val and test get at least one each."""
    n_val = max(1, math.floor(n * val_fraction + 0.5))
    n_test = max(1, math.floor(n * test_fraction + 0.5)) if test_fraction else 0
    return n - n_val - n_test, n_val, n_test


def assign_class(relative_paths: Sequence[str], seed: int, val_fraction: float,
                 test_fraction: float | None) -> list[str]:
    """The split of each file of one class, in the order given."""
    n_train, n_val, n_test = split_counts(len(relative_paths), val_fraction, test_fraction)
    ranked = sorted(range(len(relative_paths)), key=lambda i: (stable_unit(seed, relative_paths[i]), relative_paths[i]))
    names = [""] * len(relative_paths)
    for rank, i in enumerate(ranked):
        names[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return names


def make_splits(root: Path, classes: Sequence[str], samples: Sequence[tuple[Path, int]], seed: int,
                val_fraction: float, test_fraction: float | None) -> dict[str, list[tuple[Path, int]]]:
    """`samples` (path, class index) of `root/<class>/` divided into train, val and (with test_fraction)
    test; each list keeps the order of `samples`. A class too small for one image per split is a DataError."""
    by_class: dict[int, list[int]] = {}
    for pos, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(pos)
    split_of: dict[int, str] = {}
    for label, positions in by_class.items():
        n = len(positions)
        if split_counts(n, val_fraction, test_fraction)[0] < 1:
            needed = 3 if test_fraction else 2
            fractions = f"val_fraction {val_fraction:g}" + (f" and test_fraction {test_fraction:g}" if test_fraction else "")
            raise DataError(
                f"class {classes[label]} has {n} image(s) in {root}: {fractions} need at least {needed} (one in each "
                f"split and one to train on): add images to {root / classes[label]} or remove that folder"
            )
        rel = [samples[pos][0].relative_to(root).as_posix() for pos in positions]
        for pos, name in zip(positions, assign_class(rel, seed, val_fraction, test_fraction)):
            split_of[pos] = name
    names = MADE_SPLITS if test_fraction else MADE_SPLITS[:2]
    return {name: [s for pos, s in enumerate(samples) if split_of[pos] == name] for name in names}


def write_split_lists(root: Path, classes: Sequence[str], splits: dict[str, Sequence[Path]],
                      labels: dict[str, Sequence[int]], out_dir: Path) -> list[Path]:
    """`out_dir/<split>.csv` with the columns path (relative to `root`) and class, one row per image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, paths in splits.items():
        path = out_dir / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class"])
            for file, label in zip(paths, labels[name]):
                writer.writerow([_relative(file, root), classes[label]])
        written.append(path)
    return written


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
