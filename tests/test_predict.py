"""`python flows/predict.py IMAGE_OR_DIR --checkpoint PATH [--json]`: class and probability per image."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.predict import main
from harv_train.reporting.export import export_checkpoint
from tests.trained import shared_tiny


@pytest.fixture(scope="module")
def trained():
    return shared_tiny()


def _predict_json(capsys, *args):
    code = main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_a_folder_prints_one_row_per_image_with_class_and_probability(trained, capsys):
    cfg, best = trained
    assert main([f"{cfg.data_dir}/val", "--checkpoint", str(best)]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["image", "class", "probability"]
    assert len(rows) == 8  # 2 classes x 4 val images
    for row in rows:
        image, cls, prob = row.split()
        assert image.endswith(".png") and cls in ("cat", "dog") and 0.5 <= float(prob) <= 1


def test_json_for_one_image(trained, capsys):
    cfg, best = trained
    code, out = _predict_json(capsys, f"{cfg.data_dir}/val/cat/cat_0.png", "--checkpoint", best)
    assert code == 0 and out["model"] == str(best)
    [prediction] = out["predictions"]
    assert prediction["image"].endswith("cat_0.png") and prediction["class"] in ("cat", "dog")
    assert 0.5 <= prediction["probability"] <= 1


def test_exported_models_predict_what_the_checkpoint_predicts(trained, tmp_path, capsys):
    cfg, best = trained
    export_checkpoint(best, f"{cfg.data_dir}/val", tmp_path, latency_runs=1)
    results = {}
    for model in (best, tmp_path / "model.ts", tmp_path / "model.onnx"):
        code, out = _predict_json(capsys, f"{cfg.data_dir}/val", "--checkpoint", model)
        assert code == 0
        results[model.suffix] = [(p["class"], round(p["probability"], 4)) for p in out["predictions"]]
    assert results[".pth"] == results[".ts"] == results[".onnx"]


def test_an_unreadable_image_is_reported_in_place_and_fails_the_exit_code(trained, tmp_path, capsys):
    cfg, best = trained
    shutil.copy(f"{cfg.data_dir}/val/cat/cat_0.png", tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code, out = _predict_json(capsys, tmp_path, "--checkpoint", best)
    assert code == 1
    broken, good = out["predictions"]
    assert "cannot read image" in broken["error"] and "class" not in broken
    assert good["class"] in ("cat", "dog")


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
