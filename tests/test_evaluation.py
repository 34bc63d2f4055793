"""Evaluation: metrics against a hand-computed example, the report files, and bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harv_train.errors import CheckpointError, DataError
from harv_train.reporting.evaluation import Predictions, evaluate_checkpoint, load_trained_model, worst_images
from harv_train.reporting.metrics import classification_metrics
from tests.trained import oracle_logits, shared_tiny

# Hand-computed: classes a, b, c; true a a a b b c, predicted a a b b c c.
#   confusion [[2,1,0],[0,1,1],[0,0,1]]
#   precision a 2/2, b 1/2, c 1/2; recall a 2/3, b 1/2, c 1/1; F1 a 0.8, b 0.5, c 2/3
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def example():
    return classification_metrics(Y_TRUE, Y_PRED, CLASSES)


@pytest.fixture(scope="module")
def trained():
    return shared_tiny()


def test_confusion_matrix_rows_are_true_columns_predicted(example):
    assert example.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_per_class_precision_recall_f1_support(example):
    got = [(c.name, c.precision, c.recall, c.f1, c.support) for c in example.per_class]
    assert got == [
        ("a", pytest.approx(1.0), pytest.approx(2 / 3), pytest.approx(0.8), 3),
        ("b", pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5), 2),
        ("c", pytest.approx(0.5), pytest.approx(1.0), pytest.approx(2 / 3), 1),
    ]


def test_accuracy(example):
    assert example.accuracy == pytest.approx(4 / 6)


def test_macro_average_weighs_classes_equally(example):
    assert example.macro == pytest.approx({"precision": 2 / 3, "recall": 13 / 18, "f1": 59 / 90})


def test_weighted_average_weighs_classes_by_support(example):
    assert example.weighted == pytest.approx({"precision": 0.75, "recall": 4 / 6, "f1": 61 / 90})


def test_a_class_never_predicted_has_precision_zero_not_nan():
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 0, 0]), ["x", "y"])
    assert (m.per_class[1].precision, m.per_class[1].recall, m.per_class[1].f1) == (0.0, 0.0, 0.0)
    assert not np.isnan(list(m.macro.values())).any()


def test_worst_images_are_the_highest_loss_first():
    logits = np.array([[3.0, 0.0], [0.0, 3.0], [0.2, 0.0], [-3.0, 3.0]], dtype=np.float32)
    preds = Predictions([f"img{i}.png" for i in range(4)], np.array([0, 0, 0, 1]), logits)
    worst = worst_images(preds, ["cat", "dog"], k=2)
    assert [w["path"] for w in worst] == ["img1.png", "img2.png"]  # confident mistake, then an unsure hit
    assert (worst[0]["true"], worst[0]["predicted"]) == ("cat", "dog")


def test_report_files_agree_with_an_independent_evaluation(trained, tmp_path):
    cfg, best = trained
    report = evaluate_checkpoint(best, f"{cfg.data_dir}/val", tmp_path / "eval")
    data = json.loads((tmp_path / "eval" / "report.json").read_text())
    # The oracle: torchvision's model and transforms over the files, labels from the folder names.
    images = sorted(Path(cfg.data_dir, "val").rglob("*.png"))
    labels = torch.tensor([["cat", "dog"].index(p.parent.name) for p in images])
    logits = oracle_logits(best, images)
    predicted = logits.argmax(1)
    assert data["accuracy"] == pytest.approx(float((predicted == labels).float().mean()), abs=1e-9)
    assert data["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-4)
    confusion = torch.zeros(2, 2, dtype=torch.int64).index_put_((labels, predicted), torch.tensor(1), accumulate=True)
    assert data["confusion_matrix"] == confusion.tolist() and report.metrics.total == len(images)
    worst = max(data["worst_images"], key=lambda w: w["loss"])
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert (worst["path"], worst["loss"]) == (str(images[int(losses.argmax())]), pytest.approx(float(losses.max()), rel=1e-4))
    with (tmp_path / "eval" / "per_class.csv").open() as f:
        assert [row["class"] for row in csv.DictReader(f)] == ["cat", "dog", "macro avg", "weighted avg"]
    for name in ("learning_curves.png", "confusion_matrix.png", "worst_images.png"):
        with Image.open(tmp_path / "eval" / name) as img:
            assert img.format == "PNG" and min(img.size) > 200, name


def test_a_file_that_is_not_our_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a harv-train checkpoint"):
        load_trained_model(tmp_path / "other.pth")


def test_val_classes_differing_from_the_checkpoint(trained, tmp_path):
    cfg, best = trained
    val = shutil.copytree(f"{cfg.data_dir}/val", tmp_path / "val")
    (val / "dog").rename(val / "cow")
    with pytest.raises(DataError, match="only in the folder: cow; only in the checkpoint: dog"):
        evaluate_checkpoint(best, val, tmp_path / "eval")


def test_an_empty_folder(trained, tmp_path):
    _, best = trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        evaluate_checkpoint(best, tmp_path / "empty", tmp_path / "eval")


def test_a_class_folder_without_images(trained, tmp_path):
    cfg, best = trained
    val = shutil.copytree(f"{cfg.data_dir}/val", tmp_path / "val")
    for f in (val / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="dog has no images"):
        evaluate_checkpoint(best, val, tmp_path / "eval")


def test_the_dataset_root_instead_of_its_val_split_says_which_to_pass(trained, tmp_path):
    cfg, best = trained
    with pytest.raises(DataError, match="holds train/ and val/ rather than class folders: pass .*val"):
        evaluate_checkpoint(best, cfg.data_dir, tmp_path / "eval")


def test_learning_curves_take_the_epochs_after_the_best_from_last_pth(trained, tmp_path):
    from harv_train.core import checkpoints as ckpt
    from harv_train.reporting.evaluation import run_history

    _, best = trained
    state = ckpt.load_checkpoint(best)
    later = {**state, "history": state["history"] + [{**state["history"][-1], "epoch": 2}]}
    ckpt.save_checkpoint(state, tmp_path / ckpt.BEST)
    ckpt.save_checkpoint(later, tmp_path / ckpt.LAST)
    assert [h["epoch"] for h in run_history(tmp_path / ckpt.BEST, state)] == [1, 2]
    ckpt.save_checkpoint({**later, "run_uid": "another run"}, tmp_path / ckpt.LAST)
    assert [h["epoch"] for h in run_history(tmp_path / ckpt.BEST, state)] == [1]
