"""Any torchvision backbone by name: the config's list, each family's stages, head and folding, and
resnet18 / convnext_tiny trained, evaluated and exported offline; weights from a loopback server."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

from harv_train.config import MODEL_NAMES
from harv_train.core import checkpoints as ckpt
from harv_train.core.freezing import (
    feature_blocks,
    forward_from,
    freeze_early_blocks,
    frozen_block_count,
    frozen_features,
    fused_frozen_prefix,
)
from harv_train.core.models import MODEL_SPECS, build_architecture, build_model, final_linear, model_spec
from harv_train.reporting.evaluation import evaluate_checkpoint
from harv_train.reporting.export import export_checkpoint
from tests.test_models import _serving
from tests.trained import train_epochs


def test_the_config_offers_every_supported_torchvision_model():
    """The names written out in config.py are torchvision's classification models of the known families."""
    from harv_train.core.models import supported_model_names

    assert sorted(MODEL_NAMES) == supported_model_names()
    assert {"resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b3", "efficientnet_v2_s",
            "regnet_y_400mf", "convnext_tiny"} <= set(MODEL_NAMES)


def test_each_model_takes_its_weights_enums_preprocessing():
    spec = model_spec("efficientnet_b3")
    preset = models.EfficientNet_B3_Weights.DEFAULT.transforms()
    assert (spec.interpolation, spec.mean, spec.std) == ("bicubic", tuple(preset.mean), tuple(preset.std))
    assert spec.weights_url == models.EfficientNet_B3_Weights.DEFAULT.url


# Stages per family, as docs/params.md documents them.
@pytest.mark.parametrize("name, stages, frozen", [("resnet18", 5, 3), ("regnet_y_400mf", 5, 3),
                                                  ("convnext_tiny", 8, 5)])
def test_freezing_counts_the_familys_stages_and_the_split_forward_is_the_model(name, stages, frozen):
    torch.manual_seed(0)
    model = build_architecture(name, 3).eval()
    n_frozen = frozen_block_count(model, 0.7)
    assert (len(feature_blocks(model)), n_frozen) == (stages, frozen)
    freeze_early_blocks(model, n_frozen)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in feature_blocks(model)[:n_frozen].parameters()}
    assert {id(p) for p in final_linear(model).parameters()} <= trainable
    assert final_linear(model).out_features == 3
    with torch.no_grad():  # BatchNorm statistics as pretrained weights have them
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64)
    folded = fused_frozen_prefix(model, n_frozen)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every conv + BN folded
    with torch.no_grad():
        want = model(x)
        got = forward_from(model, n_frozen, frozen_features(model, n_frozen, x, folded))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# convnext_tiny with its 8 stages frozen (its 28M parameters would make the optimizer step the test's
# cost); its split forward and freezing by stage are checked above.
@pytest.mark.parametrize("name, freeze_ratio, n_frozen", [("resnet18", 0.7, 3), ("convnext_tiny", 1.0, 8)])
def test_a_new_family_trains_evaluates_and_exports_offline(name, freeze_ratio, n_frozen, make_config, tmp_path):
    cfg = make_config(model_name=name, epochs=1, freeze_ratio=freeze_ratio)
    [metrics] = train_epochs(cfg)
    assert metrics.train_batches == 4 and 0 <= metrics.val_acc <= 1
    best = cfg.checkpoints_dir / ckpt.BEST
    assert ckpt.load_checkpoint(best)["n_frozen"] == n_frozen
    report = evaluate_checkpoint(best, Path(cfg.data_dir, "val"), tmp_path / "eval")
    assert report.metrics.total == 8
    result = export_checkpoint(best, Path(cfg.data_dir, "val"), tmp_path / "export", latency_runs=1)
    assert max(result.parity["max_abs_diff"].values()) <= 1e-3 and all(result.parity["same_predictions"].values())


def test_resnet18_weights_download_from_a_server_into_torch_home(tmp_path, monkeypatch):
    """Its weights enum's file name, hash-checked as torchvision checks it; the frozen stem is the served one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("HARV_TRAIN_OFFLINE")
    reference = models.resnet18(weights=None)
    served = tmp_path / "served"
    served.mkdir()
    torch.save(reference.state_dict(), served / "blob")
    name = f"resnet18-{hashlib.sha256((served / 'blob').read_bytes()).hexdigest()[:8]}.pth"
    (served / "blob").rename(served / name)
    spec = model_spec("resnet18")
    with _serving(served) as base:
        monkeypatch.setitem(MODEL_SPECS, "resnet18", dataclasses.replace(spec, weights_url=f"{base}/{name}"))
        model = build_model("resnet18", 2, pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.fc.out_features == 2
    assert spec.weights_file().is_file()  # in torchvision's cache: read from there next time, offline
    monkeypatch.setenv("HARV_TRAIN_OFFLINE", "1")
    again = build_model("resnet18", 2, pretrained=True)
    assert torch.equal(again.conv1.weight, reference.conv1.weight)
