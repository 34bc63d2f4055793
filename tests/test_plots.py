"""The report's pictures: readable for 2 to 100 classes and long class names."""

from __future__ import annotations

import numpy as np
from PIL import Image

from harv_train.reporting import plots


def test_long_class_names_stay_distinct_after_shortening():
    names = [f"Professor_Alexandra_Longname_office_{i}_left_wing_building_B" for i in range(12)]
    labels = plots.tick_labels(names)
    assert len(set(labels)) == len(names) and max(map(len, labels)) <= 32


def test_a_100_class_confusion_matrix_gives_every_class_its_own_row(tmp_path):
    n = 100
    cm = np.diag(np.full(n, 5)) + np.eye(n, k=1, dtype=int)
    path = plots.confusion_matrix_plot(cm, [f"species_{i:03d}_with_a_long_latin_name" for i in range(n)],
                                       tmp_path / "cm.png")
    with Image.open(path) as img:
        assert img.size[1] >= n * 15  # pixels per row: room for a 5 pt label at 110 dpi


def test_learning_curves_of_a_single_epoch_render(tmp_path):
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "train_acc": 0.5, "val_acc": 0.6, "lr": 1e-3}]
    with Image.open(plots.learning_curves(history, 1, tmp_path / "lc.png")) as img:
        assert img.format == "PNG"
