"""`python flows/predict.py IMAGE_OR_DIR --checkpoint PATH [--json]`: class and probability per image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.predict import main
from harv_train.reporting.export import export_checkpoint
from tests.trained import oracle_logits, shared_tiny


@pytest.fixture(scope="module")
def trained():
    return shared_tiny()


def _predict_json(capsys, *args):
    code = main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _expected(best, images):
    """(class, probability) per image from the checkpoint's own softmax, computed without harv_train."""
    probs = oracle_logits(best, images).softmax(1)
    return [(["cat", "dog"][int(p.argmax())], float(p.max())) for p in probs]


def _val_images(cfg):
    return sorted(Path(cfg.data_dir, "val").rglob("*.png"))


def test_a_folder_prints_one_row_per_image_with_class_and_probability(trained, capsys):
    cfg, best = trained
    assert main([f"{cfg.data_dir}/val", "--checkpoint", str(best)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["image", "class", "probability"]
    images = _val_images(cfg)
    assert [row.split()[0] for row in rows] == [str(p) for p in images]  # every image, in sorted order
    for row, (cls, prob) in zip(rows, _expected(best, images), strict=True):
        _, got_cls, got_prob = row.split()
        assert got_cls == cls and float(got_prob) == pytest.approx(prob, abs=5e-5), row  # printed to 4 places


def test_json_for_one_image(trained, capsys):
    cfg, best = trained
    image = Path(cfg.data_dir, "val", "cat", "cat_0.png")
    code, out = _predict_json(capsys, image, "--checkpoint", best)
    assert code == 0 and out["model"] == str(best)
    [prediction] = out["predictions"]
    [(cls, prob)] = _expected(best, [image])
    assert prediction["image"] == str(image) and prediction["class"] == cls
    assert prediction["probability"] == pytest.approx(prob, abs=1e-6)


def test_exported_models_predict_what_the_checkpoint_predicts(trained, tmp_path, capsys):
    cfg, best = trained
    export_checkpoint(best, f"{cfg.data_dir}/val", tmp_path, latency_runs=1)
    expected = _expected(best, _val_images(cfg))
    for model in (best, tmp_path / "model.ts", tmp_path / "model.onnx"):
        code, out = _predict_json(capsys, f"{cfg.data_dir}/val", "--checkpoint", model)
        assert code == 0
        got = [(p["class"], p["probability"]) for p in out["predictions"]]
        assert [c for c, _ in got] == [c for c, _ in expected], model.suffix
        assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-5), model.suffix


def test_an_unreadable_image_is_reported_in_place_and_fails_the_exit_code(trained, tmp_path, capsys):
    cfg, best = trained
    shutil.copy(f"{cfg.data_dir}/val/cat/cat_0.png", tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code, out = _predict_json(capsys, tmp_path, "--checkpoint", best)
    assert code == 1
    broken, good = out["predictions"]
    assert "cannot read image" in broken["error"] and "class" not in broken
    [(cls, prob)] = _expected(best, [tmp_path / "good.png"])
    assert good["class"] == cls and good["probability"] == pytest.approx(prob, abs=1e-6)


def test_a_folder_without_images_is_a_one_line_error(trained, tmp_path, capsys):
    _, best = trained
    assert main([str(tmp_path), "--checkpoint", str(best)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no images" in err and err.count("\n") == 1


def test_a_checkpoint_that_is_not_ours_is_a_one_line_error(trained, tmp_path, capsys):
    cfg, _ = trained
    (tmp_path / "model.pth").write_bytes(b"not a checkpoint")
    assert main([f"{cfg.data_dir}/val", "--checkpoint", str(tmp_path / "model.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a harv-train checkpoint" in err and err.count("\n") == 1
