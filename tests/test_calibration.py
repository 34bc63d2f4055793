"""Calibration: the fitted temperature, ECE against a hand-computed example, the calibrated checkpoint's
report, and the same calibrated probabilities from every runtime (PyTorch, TorchScript, ONNX, MLflow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from flows.predict import main as predict_main
from harv_train.core import checkpoints as ckpt
from harv_train.core.calibration import calibrate, expected_calibration_error, fit_temperature, reliability_bins
from harv_train.reporting.evaluation import evaluate_checkpoint, load_eval_split, load_trained_model
from harv_train.reporting.export import export_checkpoint
from harv_train.reporting.post_training import calibrate_checkpoint
from tests.images import file_one_image_under_the_other_class
from tests.trained import oracle_logits, shared_tiny


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    """Labels sampled from softmax(z / 2.5): the NLL-optimal temperature of z is 2.5."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 5, generator=g) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, abs=0.08)


def test_ece_counts_each_bins_gap_weighted_by_its_share():
    """Hand-computed, 15 bins: two predictions at 0.95 (one right) fall in bin 14, |0.5 - 0.95| = 0.45;
    two at 0.55 (both right) in bin 8, |1 - 0.55| = 0.45; ECE = 2/4 * 0.45 + 2/4 * 0.45 = 0.45."""
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 0, 1])
    bins = reliability_bins(probs, labels)
    assert bins.counts[14] == 2 and bins.counts[8] == 2 and sum(bins.counts) == 4
    assert bins.ece == pytest.approx(0.45)


def test_temperature_scaling_lowers_ece_and_changes_no_prediction():
    """Logits three times too confident: the fitted temperature undoes it."""
    g = torch.Generator().manual_seed(1)
    true_logits = torch.randn(5000, 4, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)
    logits = true_logits * 3
    t = fit_temperature(logits, labels)
    assert expected_calibration_error(logits, labels, t) < 0.3 * expected_calibration_error(logits, labels)
    assert torch.equal((logits / t).argmax(1), logits.argmax(1))


def test_a_val_set_the_model_gets_all_right_keeps_the_temperature_at_one():
    """No error: the NLL only falls as T -> 0, so a fit would make the model as sure as the bound allows."""
    logits = torch.tensor([[4.0, 1.0], [0.5, 3.0], [2.0, 1.5]])
    labels = torch.tensor([0, 1, 0])
    assert fit_temperature(logits, labels) < 0.2  # what fitting anyway would serve
    result = calibrate(logits, labels)
    assert (result.temperature, result.errors) == (1.0, 0)
    assert (result.ece_after, result.nll_after) == (result.ece_before, result.nll_before)
    one_wrong = calibrate(logits, torch.tensor([0, 1, 1]))
    assert one_wrong.errors == 1 and one_wrong.temperature != 1.0


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A copy of the shared tiny checkpoint, calibrated on a copy of its val images with one image of
    each class filed under the other (it gets the val images as they are all right, which would leave
    T at 1); returns that val folder, the checkpoint and the calibration."""
    cfg, best = shared_tiny()
    root = tmp_path_factory.mktemp("calibrated")
    path = root / ckpt.BEST
    shutil.copyfile(best, path)
    val = file_one_image_under_the_other_class(shutil.copytree(Path(cfg.data_dir, "val"), root / "val"))
    state, _ = load_trained_model(path)
    result = calibrate_checkpoint(path, load_eval_split(state, val))
    return val, path, result


def test_calibration_writes_the_temperature_and_what_it_did_into_the_checkpoint(calibrated):
    _, path, result = calibrated
    state = ckpt.load_checkpoint(path)
    assert state["temperature"] == result.temperature and result.temperature != 1.0
    assert state["calibration"]["errors"] == result.errors == 2
    assert state["calibration"]["ece_after"] <= state["calibration"]["ece_before"]
    assert state["calibration"]["nll_after"] <= state["calibration"]["nll_before"]


def test_the_report_gives_ece_before_and_after_and_a_reliability_diagram(calibrated, tmp_path):
    val, path, result = calibrated
    report = evaluate_checkpoint(path, val, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["temperature"] == result.temperature
    assert saved["ece"] == pytest.approx(result.ece_before) and saved["ece_calibrated"] == pytest.approx(result.ece_after)
    assert report.calibration["loss_calibrated"] == pytest.approx(result.nll_after)
    with Image.open(report.files["reliability"]) as diagram:
        assert diagram.width >= 1.9 * diagram.height  # two panels: softmax and temperature


@pytest.fixture(scope="module")
def hot(tmp_path_factory):
    """The tiny checkpoint with temperature 2 (visible in its probabilities; its perfectly separated
    val set would leave T at 1), exported, and as the MLflow model's files."""
    from harv_train.tracking.pyfunc_model import write_model_files

    cfg, best = shared_tiny()
    root = tmp_path_factory.mktemp("hot")
    path = root / ckpt.BEST
    ckpt.save_checkpoint({**ckpt.load_checkpoint(best), "temperature": 2.0}, path)
    export_checkpoint(path, Path(cfg.data_dir, "val"), root / "export", latency_runs=1)
    # The MLflow model's own ONNX export (onnx=True, as the flow logs it) is checked by
    # tests/test_flow.py::test_logged_model_computes_what_the_best_checkpoint_computes.
    files = write_model_files(ckpt.load_checkpoint(path), root / "pyfunc", onnx=root / "export" / "model.onnx")
    images = sorted(Path(cfg.data_dir, "val").rglob("*.png"))
    return cfg, path, root, files, images


def _predicted(capsys, model, target, *extra) -> list[float]:
    assert predict_main([str(target), "--checkpoint", str(model), "--json", *extra]) == 0
    return [p["probability"] for p in json.loads(capsys.readouterr().out)["predictions"]]


def test_every_runtime_gives_the_calibrated_probabilities(hot, capsys):
    """softmax(logits / T), with the logits from torchvision's own model: predict on the checkpoint,
    TorchScript and ONNX; the MLflow model on ONNX and on PyTorch."""
    from harv_train.tracking.pyfunc_model import classify, load_predictor

    cfg, path, root, files, images = hot
    logits = oracle_logits(path, images)
    want = (logits / 2.0).softmax(1)
    assert (want.max(1).values - logits.softmax(1).max(1).values).abs().min() > 1e-3  # T changes each one
    for model in (path, root / "export" / "model.ts", root / "export" / "model.onnx"):
        got = _predicted(capsys, model, Path(cfg.data_dir, "val"))
        assert got == pytest.approx(want.max(1).values.tolist(), abs=1e-5), model.name
    card = json.loads(Path(files["model_card"]).read_text())
    assert card["temperature"] == 2.0
    for onnx in (Path(files["onnx"]), None):
        predictor = load_predictor(card, Path(files["weights"]), onnx)
        rows = classify(predictor, [p.read_bytes() for p in images])
        got = torch.tensor([[r["probabilities"][c] for c in card["classes"]] for r in rows])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"MLflow model on {onnx or 'torch'}")


def test_tta_flip_averages_the_image_and_its_mirror(hot, capsys, tmp_path):
    cfg, path, _, _, images = hot
    mirrors = []
    for i, image in enumerate(images):
        mirror = tmp_path / f"{i}.png"
        ImageOps.mirror(Image.open(image).convert("RGB")).save(mirror)
        mirrors.append(mirror)
    want = ((oracle_logits(path, images) / 2).softmax(1) + (oracle_logits(path, mirrors) / 2).softmax(1)) / 2
    got = _predicted(capsys, path, Path(cfg.data_dir, "val"), "--tta", "flip")
    assert got == pytest.approx(want.max(1).values.tolist(), abs=1e-5)
    assert got != pytest.approx(_predicted(capsys, path, Path(cfg.data_dir, "val")), abs=1e-5)
