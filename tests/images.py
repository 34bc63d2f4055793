"""Tiny learnable ImageFolder trees for the tests (a plain module: conftest is pytest's alone;
importing it a second time as tests.conftest made a second Prefect home that nobody removed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    n_train: int = 8,
    n_val: int = 4,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """A learnable dataset: each class has its own dominant colour, plus noise."""
    rng = np.random.default_rng(seed)
    palette = np.array([[200, 40, 40], [40, 40, 200], [40, 180, 40], [180, 180, 40]])
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                pixels = np.clip(palette[label % len(palette)] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


def file_one_image_under_the_other_class(split: Path) -> Path:
    """Move the first image of each of the split's two classes into the other's folder: a model that
    learnt the colours gets those two wrong (what a temperature needs to be fitted). Returns `split`."""
    first, second = sorted(p for p in split.iterdir() if p.is_dir())
    a, b = sorted(first.iterdir())[0], sorted(second.iterdir())[0]
    a.rename(second / f"moved-{a.name}")
    b.rename(first / f"moved-{b.name}")
    return split
