"""The embedded demo dataset: real LFW crops from scikit-image, written with no network."""

from __future__ import annotations

from PIL import Image

from harv_train.core.data import scan_dataset
from harv_train.demo_data import write_demo_dataset


def test_demo_dataset_is_a_seeded_imagefolder_of_faces_and_background(tmp_path):
    counts = write_demo_dataset(tmp_path / "demo")
    assert counts == {"train": 150, "val": 50}
    splits = scan_dataset(tmp_path / "demo")
    assert splits["train"].classes == ["background", "face"]
    assert splits["val"].counts() == {"background": 25, "face": 25}
    first = splits["train"].samples[0][0]
    with Image.open(first) as img:
        assert img.mode == "RGB" and img.size == (25, 25)


def test_demo_split_is_the_same_every_time(tmp_path):
    write_demo_dataset(tmp_path / "a")
    write_demo_dataset(tmp_path / "b")
    names = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))  # noqa: E731
    assert names(tmp_path / "a") == names(tmp_path / "b")
