"""The dataset digest: the same files give the same digest, a changed file another."""

from __future__ import annotations

import os

from harv_train.core.data import scan_dataset
from harv_train.core.lineage import describe_dataset


def _info(root):
    indexes = scan_dataset(root)
    return describe_dataset(root, indexes["train"].classes,
                            {n: ([p for p, _ in i.samples], [label for _, label in i.samples]) for n, i in indexes.items()})


def test_the_same_files_give_the_same_digest_and_a_touched_file_another(image_folder):
    first = _info(image_folder)
    assert _info(image_folder) == first
    assert first.profile == {"splits": {"train": 16, "val": 8},
                             "class_counts": {"train": {"cat": 8, "dog": 8}, "val": {"cat": 4, "dog": 4}}}
    touched = image_folder / "val" / "dog" / "dog_0.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert _info(image_folder).digest != first.digest
