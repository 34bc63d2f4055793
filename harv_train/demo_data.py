"""Write a small real dataset with no network: `python -m harv_train.demo_data DIR`.

scikit-image ships `skimage/data/lfw_subset.npy`: 200 grayscale 25x25 crops from Labeled Faces in
the Wild, the first 100 faces and the last 100 non-face background crops. They become RGB JPEGs in
`DIR/{train,val}/{face,background}/`, split per class with a fixed seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("face", "background")


def lfw_subset() -> np.ndarray:
    try:
        import skimage
    except ImportError:
        sys.exit("error: the demo data needs scikit-image: pip install scikit-image")
    path = Path(skimage.__file__).parent / "data" / "lfw_subset.npy"
    if not path.is_file():
        sys.exit(f"error: {path} is missing from this scikit-image install: reinstall scikit-image")
    return np.load(path)


def write_demo_dataset(out_dir: str | Path, val_fraction: float = 0.25, seed: int = 0) -> dict[str, int]:
    """Write the ImageFolder tree; returns the number of images per split. Existing files are kept."""
    images = lfw_subset()
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label, name in enumerate(CLASSES):
        members = np.arange(100) + 100 * label
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction))
        for split, chosen in (("val", members[:n_val]), ("train", members[n_val:])):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                gray = (images[i] * 255).round().astype(np.uint8)
                Image.fromarray(gray, mode="L").convert("RGB").save(folder / f"lfw_{i:03d}.jpg", quality=95)
                counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="data/demo", help="where to write (default data/demo)")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_demo_dataset(args.out_dir, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out_dir} (classes: {', '.join(CLASSES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
