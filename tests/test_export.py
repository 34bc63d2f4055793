"""Export: TorchScript and ONNX compute what the checkpoint computes, and carry its classes and normalization."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from harv_train.reporting import export
from harv_train.core.augment import normalize
from harv_train.errors import ExportError
from harv_train.reporting.evaluation import load_eval_split, load_trained_model
from harv_train.core.checkpoints import load_model_from_checkpoint
from tests.trained import shared_tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg, best = shared_tiny(("cat", "dog", "fox"))
    out = tmp_path_factory.mktemp("export")
    result = export.export_checkpoint(best, f"{cfg.data_dir}/val", out, latency_runs=3)
    state, model = load_trained_model(best)
    split = load_eval_split(state, f"{cfg.data_dir}/val")
    x = normalize(split.images, tuple(state["mean"]), tuple(state["std"]))
    with torch.no_grad():
        reference = model(x).numpy()
    return result, state, x, reference


def test_torchscript_matches_pytorch_on_val_images(exported):
    result, _, x, reference = exported
    module = export.load_torchscript(result.files["torchscript"])
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), reference, atol=1e-5, rtol=0)


def test_onnx_in_onnxruntime_matches_pytorch_on_val_images(exported):
    result, _, x, reference = exported
    session = export.onnx_session(result.files["onnx"], threads=1)
    logits = session.run(None, {"input": x.numpy()})[0]  # a batch of 12: the batch axis is dynamic
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)


def test_parity_and_latency_are_reported(exported):
    result, _, x, _ = exported
    report = json.loads(result.files["export_report"].read_text())
    assert report["parity"]["images"] == len(x)
    assert set(report["parity"]["max_abs_diff"]) == {"torchscript", "onnxruntime"}
    assert all(d <= report["parity"]["tolerance"] for d in report["parity"]["max_abs_diff"].values())
    assert set(report["latency_ms"]) == {"pytorch", "torchscript", "onnxruntime"}
    assert all(ms > 0 for ms in report["latency_ms"].values())
    assert report["environment"]["batch_size"] == 1


def test_classes_and_normalization_are_saved_beside_and_inside_the_models(exported):
    result, state, _, _ = exported
    card = json.loads(result.files["model_card"].read_text())
    assert card["classes"] == ["cat", "dog", "fox"]
    assert (card["mean"], card["std"], card["img_size"]) == (list(state["mean"]), list(state["std"]), 32)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(result.files["onnx"])).metadata_props}
    assert props["classes"] == card["classes"] and props["mean"] == card["mean"]
    extra = {"model.json": ""}
    with export.quiet_deprecations():
        torch.jit.load(str(result.files["torchscript"]), _extra_files=extra)
    assert json.loads(extra["model.json"])["classes"] == card["classes"]


def test_an_export_that_differs_from_pytorch_is_refused_and_not_written(exported, tmp_path, monkeypatch):
    _, state, _, _ = exported
    real_export_onnx = export.export_onnx

    def export_a_different_model(model, example, path, card):
        other = load_model_from_checkpoint(state)
        with torch.no_grad():
            other.classifier[-1].bias.add_(1.0)  # every logit off by exactly 1
        return real_export_onnx(other, example, path, card)

    monkeypatch.setattr(export, "export_onnx", export_a_different_model)
    split = load_eval_split(state, state["params"]["data_dir"] + "/val")
    with pytest.raises(ExportError, match=r"onnxruntime 1\.0\de\+00 > tolerance"):
        export.export_model(load_model_from_checkpoint(state), state, split, tmp_path, latency_runs=1)
    assert list(tmp_path.iterdir()) == []
