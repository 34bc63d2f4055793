"""Where a run's data and code came from: a digest of the dataset's files, and the git commit.

The digest is SHA-256 over every image's split, path relative to `data_dir`, class, size and
modification time (not its pixels: hashing a large dataset's contents would cost a full read per
run). Two runs on the same files, split the same way, get the same digest; touching, adding,
removing or moving an image between splits changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    digest: str  # 16 hex digits
    source: str  # the data_dir, absolute
    profile: dict  # split sizes and class counts per split

    def profile_json(self) -> str:
        return json.dumps(self.profile, sort_keys=True)


def describe_dataset(data_dir: str | Path, classes: Sequence[str],
                     splits: dict[str, tuple[Sequence[Path], Sequence[int]]]) -> DatasetInfo:
    """`splits`: each split's (paths, class indices) as trained."""
    root = Path(data_dir).resolve()
    lines = []
    counts: dict[str, dict[str, int]] = {}
    for name, (paths, labels) in splits.items():
        counts[name] = dict.fromkeys(classes, 0)
        for path, label in zip(paths, labels):
            stat = os.stat(path)
            counts[name][classes[label]] += 1
            lines.append(f"{name}\t{_relative(Path(path), root)}\t{classes[label]}\t{stat.st_size}\t{stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(sorted(lines)).encode("utf-8")).hexdigest()[:16]
    profile = {"splits": {name: sum(c.values()) for name, c in counts.items()}, "class_counts": counts}
    return DatasetInfo(name=root.name, digest=digest, source=str(root), profile=profile)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def source_tags(code_dir: str | Path) -> dict[str, str]:
    """`mlflow.source.git.commit` and `harv_train.git_dirty` (tracked files changed) when `code_dir`
    is in a git checkout and git is installed; otherwise nothing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "harv_train.git_dirty": str(dirty).lower()}
