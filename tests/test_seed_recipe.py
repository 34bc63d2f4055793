"""The seed's recipe is pinned: a tiny run's per-epoch metrics, as the code before issue 14 computed them.

Recipe options added later (schedules, label smoothing, other augmentations, EMA, ...) must leave
these numbers alone while they are off. Produced by commit afbfdf6 (before any issue-14 change) with
the run below, 2 threads; `threads: 2` fixes the reduction order, so they are exact on any machine
with the same torch build, and a changed recipe moves them by far more than the tolerance."""

from __future__ import annotations

import pytest

from harv_train.config import load_config
from tests.images import write_image_folder
from tests.trained import calibrated_weights, train_epochs

PINNED = [  # epoch, train_loss, train_acc, val_loss, val_acc, lr
    (1, 0.6492850482463837, 0.625, 0.053392742745927535, 1.0, 0.001),
    (2, 0.2740182876586914, 0.875, 0.005034806672483683, 1.0, 0.001),
]


def test_the_seed_recipe_gives_the_pinned_metrics(tmp_path):
    data = write_image_folder(tmp_path / "data")
    cfg = load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": True, "weights_path": str(calibrated_weights()),
        "epochs": 2, "batch_size": 4, "img_size": 32, "lr": 0.001, "classes": None, "data_dir": str(data),
        "artifacts_dir": str(tmp_path / "artifacts"), "num_workers": 0, "threads": 2, "lr_patience": 0,
    })
    got = [(m.epoch, m.train_loss, m.train_acc, m.val_loss, m.val_acc, m.lr) for m in train_epochs(cfg)]
    for row, want in zip(got, PINNED, strict=True):
        assert row[0] == want[0] and row[2] == want[2] and row[4:] == want[4:], row
        assert row[1] == pytest.approx(want[1], rel=1e-6) and row[3] == pytest.approx(want[3], rel=1e-6), row
