"""Backbones: build, forward, loss, backward, checkpoint round trip; offline ImageNet weights."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from harv_train.core import checkpoints as ckpt
from harv_train.errors import WeightsError
from harv_train.core.freezing import freeze_early_blocks, frozen_block_count
from harv_train.core.models import (
    MODEL_SPECS,
    build_architecture,
    build_efficientnet_lite0_architecture,
    build_model,
    format_parameter_counts,
    load_imagenet_weights,
    efficientnet_lite0_file,
    torchvision_cache_file,
)
from torchvision import models

ALL_MODELS = list(MODEL_SPECS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_pass_gives_one_logit_per_class(name):
    model = build_architecture(name, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_loss_and_backward_reach_only_trainable_parameters(name):
    model = build_architecture(name, 2)
    n_frozen = frozen_block_count(model, 0.7)
    freeze_early_blocks(model, n_frozen)
    loss = nn.CrossEntropyLoss()(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    frozen = list(model.features[:n_frozen].parameters())
    assert frozen and all(p.grad is None for p in frozen)
    head = model.classifier[-1]
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_checkpoint_round_trip_restores_identical_outputs(name, tmp_path):
    model = build_architecture(name, 2).eval()
    path = tmp_path / "m.pth"
    ckpt.save_checkpoint({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 1,
                          "best_val_acc": 0.5, "classes": ["a", "b"], "params": {}}, path)
    state = torch.load(path, weights_only=True)
    restored = build_architecture(name, 2).eval()
    restored.load_state_dict(state["model"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_parameter_counts_line_has_the_seed_shape():
    model = build_architecture("mobilenet_v3_small", 2)
    freeze_early_blocks(model, frozen_block_count(model, 0.7))
    # 1.52M in all; feature blocks 9-12 (0.74M) and the 2-class head (0.59M) train.
    assert format_parameter_counts(model) == "Parameters: 1.5M (1.3M trainable)"


def test_torchvision_weights_load_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = models.mobilenet_v3_small(weights=None)
    target = torchvision_cache_file(models.MobileNet_V3_Small_Weights.IMAGENET1K_V1)
    assert str(target).startswith(str(tmp_path))
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    model = build_model("mobilenet_v3_small", 2, pretrained=True)
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    assert model.classifier[-1].out_features == 2


def test_missing_weights_stop_with_a_fix_instead_of_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="not available offline .*set weights_path.*pretrained: false"):
        build_model("efficientnet_b0", 2, pretrained=True)


@contextlib.contextmanager
def _serving(directory: Path):
    """A real HTTP server on loopback serving `directory`; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _served_weights(directory: Path, digest_ok: bool = True) -> tuple[nn.Module, str]:
    """mobilenet_v3_small weights saved under torchvision's naming (name-<sha256 prefix>.pth)."""
    reference = models.mobilenet_v3_small(weights=None)
    directory.mkdir()
    blob = directory / "blob"
    torch.save(reference.state_dict(), blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()[:8] if digest_ok else "00000000"
    name = f"mobilenet_v3_small-{digest}.pth"
    blob.rename(directory / name)
    return reference, name


def test_missing_torchvision_weights_are_downloaded_into_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("HARV_TRAIN_OFFLINE")
    reference, name = _served_weights(tmp_path / "served")
    spec = MODEL_SPECS["mobilenet_v3_small"]
    with _serving(tmp_path / "served") as base:
        monkeypatch.setitem(MODEL_SPECS, "mobilenet_v3_small", dataclasses.replace(spec, weights_url=f"{base}/{name}"))
        model = build_model("mobilenet_v3_small", 2, pretrained=True)
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)
    assert spec.weights_file().is_file()  # cached where torchvision looks: no second download


def test_the_default_model_downloads_its_weights_and_trains_at_224_px(make_config, tmp_path, monkeypatch):
    """params.yaml's model as a user first runs it: mobilenet_v3_small, pretrained, 224 px, freeze_ratio
    0.7, channels_last, its weights fetched into TORCH_HOME (from a loopback server here, in the
    real state dict's shape and with torchvision's file naming), then one epoch of training."""
    from harv_train.config import TrainConfig
    from harv_train.core.session import TrainingSession
    from tests.trained import calibrated_weights

    defaults = TrainConfig()
    assert (defaults.model_name, defaults.pretrained, defaults.img_size) == ("mobilenet_v3_small", True, 224)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("HARV_TRAIN_OFFLINE")
    served = tmp_path / "served"
    served.mkdir()
    blob = calibrated_weights().read_bytes()
    name = f"mobilenet_v3_small-{hashlib.sha256(blob).hexdigest()[:8]}.pth"
    (served / name).write_bytes(blob)
    spec = MODEL_SPECS["mobilenet_v3_small"]
    cfg = make_config(pretrained=True, img_size=224, batch_size=16, epochs=1, freeze_ratio=defaults.freeze_ratio,
                      channels_last=defaults.channels_last)
    with _serving(served) as base:
        monkeypatch.setitem(MODEL_SPECS, "mobilenet_v3_small", dataclasses.replace(spec, weights_url=f"{base}/{name}"))
        session = TrainingSession(cfg)
        session.start(None)
    assert spec.weights_file().read_bytes() == blob  # cached where torchvision looks
    [metrics] = [session.train_epoch(0, progress=False)]
    assert metrics.train_batches == 1 and np.isfinite(metrics.val_loss)
    trained = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
    reference = torch.load(calibrated_weights(), weights_only=True)
    assert (trained["img_size"], trained["n_frozen"]) == (224, 9)
    assert torch.equal(trained["model"]["features.0.0.weight"], reference["features.0.0.weight"])  # frozen: as served
    assert not torch.equal(trained["model"]["features.12.0.weight"], reference["features.12.0.weight"])  # trained


def test_a_download_that_fails_its_hash_check_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("HARV_TRAIN_OFFLINE")
    _, name = _served_weights(tmp_path / "served", digest_ok=False)
    spec = MODEL_SPECS["mobilenet_v3_small"]
    with _serving(tmp_path / "served") as base:
        monkeypatch.setitem(MODEL_SPECS, "mobilenet_v3_small", dataclasses.replace(spec, weights_url=f"{base}/{name}"))
        with pytest.raises(WeightsError, match="downloading .* failed: invalid hash value"):
            build_model("mobilenet_v3_small", 2, pretrained=True)
    assert not spec.weights_file().exists()


def test_weights_path_is_used_when_given(tmp_path):
    reference = models.efficientnet_b0(weights=None)
    path = tmp_path / "b0.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("efficientnet_b0", 4, pretrained=True, weights_path=str(path))
    assert torch.equal(model.features[0][0].weight, reference.features[0][0].weight)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(models.mobilenet_v3_small(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit efficientnet_b0"):
        build_model("efficientnet_b0", 2, weights_path=str(path))


def test_efficientnet_lite0_is_really_imagenet_pretrained():
    """The bundled weights classify scikit-image's cat photo as a cat (ImageNet classes 281-285)."""
    import skimage.data

    model = build_efficientnet_lite0_architecture()
    load_imagenet_weights(model, "efficientnet_lite0", efficientnet_lite0_file())
    image = Image.fromarray(skimage.data.chelsea()).resize((224, 224), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        probs = model.eval()(x[None]).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs.max()) > 0.5


def test_efficientnet_lite0_has_no_squeeze_excitation_and_uses_relu6():
    model = build_efficientnet_lite0_architecture()
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SqueezeExcitation" not in kinds and "SiLU" not in kinds and "ReLU6" in kinds
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
