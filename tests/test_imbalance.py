"""Class imbalance: balanced loss weights and sampler, select_metric, the log's counts and warning."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harv_train.config import load_config
from harv_train.core.imbalance import balanced_class_weights, epoch_order, imbalance_warning
from harv_train.reporting.evaluation import evaluate_checkpoint
from tests.trained import calibrated_weights, train_epochs

_COLOURS = {"cat": (120, 100, 100), "dog": (100, 100, 120)}  # close colours, heavy noise: a hard, skewed task


def _skewed(root: Path, train: dict[str, int], val: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("val", dict.fromkeys(train, val))):
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-60, 60, size=(32, 32, 3))
                Image.fromarray(np.clip(np.array(_COLOURS[name]) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def _config(data: Path, artifacts: Path, **options):
    return load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": True, "weights_path": str(calibrated_weights()),
        "epochs": 1, "batch_size": 8, "img_size": 32, "lr": 0.001, "classes": None, "data_dir": str(data),
        "artifacts_dir": str(artifacts), "num_workers": 0, "threads": 1, **options})


def test_balanced_sampler_draws_each_class_equally_often_from_the_seed():
    labels = torch.tensor([0] * 90 + [1] * 10)
    order = epoch_order(labels, torch.Generator().manual_seed(7), "balanced")
    assert torch.equal(order, epoch_order(labels, torch.Generator().manual_seed(7), "balanced"))
    drawn_minority = int((labels[order] == 1).sum())
    assert len(order) == 100 and 35 <= drawn_minority <= 65  # 10 of 100 without it


def test_balanced_class_weights_are_inverse_frequency():
    weights = balanced_class_weights(torch.tensor([40, 10]))
    assert weights.tolist() == pytest.approx([50 / 80, 50 / 20])


def test_a_five_fold_imbalance_is_warned_about_below_not():
    assert imbalance_warning({"cat": 40, "dog": 9}) is None
    warning = imbalance_warning({"cat": 40, "dog": 8})
    assert "cat has 40 images, dog 8 (5.0x)" in warning and "\n" not in warning


def test_balanced_options_give_the_same_run_for_the_same_seed(tmp_path):
    data = _skewed(tmp_path / "data", {"cat": 20, "dog": 4})
    options = {"class_weights": "balanced", "sampler": "balanced", "select_metric": "val_macro_f1", "epochs": 2}
    first = train_epochs(_config(data, tmp_path / "a", **options))
    second = train_epochs(_config(data, tmp_path / "b", **options))
    assert [m.to_dict() | {"train_time_s": 0, "val_time_s": 0} for m in first] == \
        [m.to_dict() | {"train_time_s": 0, "val_time_s": 0} for m in second]
    weights = [torch.load(tmp_path / d / "checkpoints" / "last.pth", weights_only=True)["model"] for d in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_balancing_lifts_the_recall_of_a_class_cut_to_a_fifth(tmp_path):
    data = _skewed(tmp_path / "data", {"cat": 20, "dog": 4})
    recall = {}
    for name, options in (("plain", {}), ("balanced", {"class_weights": "balanced", "sampler": "balanced"})):
        cfg = _config(data, tmp_path / name, **options)
        train_epochs(cfg)
        report = evaluate_checkpoint(cfg.checkpoints_dir / "best_model.pth", data / "val", tmp_path / f"eval-{name}")
        recall[name] = {c.name: c.recall for c in report.metrics.per_class}["dog"]
    assert recall["balanced"] > recall["plain"] + 0.3, recall


def test_select_metric_val_macro_f1_picks_the_epoch_with_the_best_macro_f1(tmp_path):
    data = _skewed(tmp_path / "data", {"cat": 20, "dog": 4})
    history = train_epochs(_config(data, tmp_path / "a", select_metric="val_macro_f1", epochs=3, sampler="balanced"))
    best = max(history, key=lambda m: (m.val_macro_f1, -m.val_loss))
    assert [m.epoch for m in history if m.is_best][-1] == best.epoch
    assert len({m.val_macro_f1 for m in history}) > 1  # the epochs differ: the choice means something


def test_the_log_prints_class_counts_and_warns_at_five_fold(make_config, tmp_path, caplog):
    from harv_train.core.session import TrainingSession
    from tasks.training import load_data_task

    data = _skewed(tmp_path / "skewed", {"cat": 10, "dog": 2}, val=1)
    with caplog.at_level(logging.INFO, logger="harv_train"):
        load_data_task.fn(TrainingSession(make_config(data_dir=str(data))))
    assert "train per class: {'cat': 10, 'dog': 2}" in caplog.text
    assert "imbalanced: cat has 10 images, dog 2 (5.0x)" in caplog.text


@pytest.mark.parametrize("select_metric, best_epoch", [("val_acc", 1), ("val_macro_f1", 2)])
def test_select_metric_decides_which_epoch_is_best_model_pth(make_config, monkeypatch, select_metric, best_epoch):
    # Validation scripted to disagree (epoch 1: higher accuracy, epoch 2: higher macro F1, as on a skewed
    # val set); training, early stopping and the checkpoint writes are the real ones.
    from harv_train.core import session as session_module
    from harv_train.core.engine import EpochResult

    scripted = iter([(0.9, 0.5), (0.8, 0.7)])

    def evaluate(*args, **kwargs):
        acc, f1 = next(scripted)
        return EpochResult(loss=0.5, acc=acc, batches=1, images=8, seconds=0.0, macro_f1=f1)

    monkeypatch.setattr(session_module, "evaluate", evaluate)
    cfg = make_config(select_metric=select_metric, epochs=2)
    train_epochs(cfg)
    assert torch.load(cfg.checkpoints_dir / "best_model.pth", weights_only=True)["epoch"] == best_epoch
