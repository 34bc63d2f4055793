"""Freezing the early backbone and running the frozen part as a fixed feature extractor.

The unit of `freeze_ratio` is the family's natural stage (harv_train.core.models.Family): a
top-level block of `features` for MobileNet, EfficientNet, ConvNeXt and DenseNet (13 blocks in
MobileNetV3-Small, 9 in EfficientNet-B0/Lite0, 8 in ConvNeXt: stem, 4 stages, 3 downsamplings);
the stem and the four layers of a ResNet or RegNet (5). The first
`floor(freeze_ratio * number_of_blocks)` blocks are frozen, the later blocks and the classifier
head always train. Frozen blocks stay in eval mode (their BatchNorm statistics never drift) and run
outside autograd, so they cost only a forward pass.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from harv_train.core.models import family_of


def feature_blocks(model: nn.Module) -> nn.Sequential:
    """The backbone's stages in forward order, as a Sequential of the model's own modules."""
    return family_of(model).stages(model)


def frozen_block_count(model: nn.Module, freeze_ratio: float) -> int:
    n_blocks = len(feature_blocks(model))
    # The epsilon keeps 0.7 * 10 == 7 from becoming 6 through float rounding.
    return min(n_blocks, math.floor(freeze_ratio * n_blocks + 1e-9))


def freeze_early_blocks(model: nn.Module, n_frozen: int) -> None:
    """requires_grad=False on the first n_frozen blocks, True everywhere else."""
    for p in model.parameters():
        p.requires_grad_(True)
    for block in feature_blocks(model)[:n_frozen]:
        for p in block.parameters():
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, n_frozen: int) -> None:
    """model.train() for the trainable part, eval() for the frozen prefix.

    `model.train()` alone would put the frozen BatchNorm layers back into training mode, where they
    update their running statistics on every batch even though their weights never change.
    """
    model.train()
    for block in feature_blocks(model)[:n_frozen]:
        block.eval()


def frozen_features(
    model: nn.Module, n_frozen: int, x: torch.Tensor, prefix: nn.Module | None = None
) -> torch.Tensor:
    """Output of the frozen prefix (or of `prefix`, its fused copy): no autograd graph is built for it."""
    if n_frozen == 0:
        return x
    with torch.no_grad():
        return (prefix or feature_blocks(model)[:n_frozen])(x)


def fused_frozen_prefix(model: nn.Module, n_frozen: int) -> nn.Module:
    """A copy of the frozen blocks with every BatchNorm folded into the convolution before it.

    Frozen blocks always run in eval mode, where conv + BatchNorm is one affine map: folding computes
    the same function (to ~1e-8) and takes about half the time here, since the BatchNorm passes over
    the large early feature maps disappear. It is a copy: the model keeps its layers, so checkpoints
    keep their format. Valid as long as the frozen weights do not change, i.e. for a whole run.
    """
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(feature_blocks(model)[:n_frozen]).eval())


def forward_from(model: nn.Module, n_frozen: int, h: torch.Tensor) -> torch.Tensor:
    """The rest of the network, from the frozen prefix's output to the logits."""
    h = feature_blocks(model)[n_frozen:](h)
    return family_of(model).head(model, h)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer holds: frozen parameters never see weight decay or Adam state."""
    return [p for p in model.parameters() if p.requires_grad]
