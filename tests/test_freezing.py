"""freeze_ratio: which blocks train, frozen BatchNorm stays in eval, the optimizer holds no frozen weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harv_train.core.freezing import (
    forward_from,
    freeze_early_blocks,
    frozen_block_count,
    frozen_features,
    fused_frozen_prefix,
    set_train_mode,
    trainable_parameters,
)
from harv_train.core.models import MODEL_SPECS, build_architecture


def test_freeze_ratio_counts_feature_blocks():
    model = build_architecture("mobilenet_v3_small", 2)  # 13 feature blocks
    assert [frozen_block_count(model, r) for r in (0, 0.5, 0.7, 1)] == [0, 6, 9, 13]


def test_head_and_later_blocks_train_early_blocks_do_not():
    model = build_architecture("mobilenet_v3_small", 2)
    freeze_early_blocks(model, 9)
    assert not any(p.requires_grad for p in model.features[:9].parameters())
    assert all(p.requires_grad for p in model.features[9:].parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_full_freeze_still_trains_the_head():
    model = build_architecture("efficientnet_lite0", 2)
    freeze_early_blocks(model, frozen_block_count(model, 1.0))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.classifier.named_parameters(prefix="classifier")
    ]


def test_frozen_batchnorm_stays_in_eval_mode_while_training():
    model = build_architecture("mobilenet_v3_small", 2)
    freeze_early_blocks(model, 9)
    set_train_mode(model, 9)
    frozen_bn = [m for m in model.features[:9].modules() if isinstance(m, nn.BatchNorm2d)]
    live_bn = [m for m in model.features[9:].modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen_bn and not any(m.training for m in frozen_bn)
    assert live_bn and all(m.training for m in live_bn)


def test_frozen_running_stats_do_not_drift_during_a_training_step():
    model = build_architecture("mobilenet_v3_small", 2)
    freeze_early_blocks(model, 9)
    before = {k: v.clone() for k, v in model.features[:9].state_dict().items()}
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=0.1, weight_decay=0.1)
    set_train_mode(model, 9)
    x = torch.randn(4, 3, 64, 64) * 3 + 1
    logits = forward_from(model, 9, frozen_features(model, 9, x))
    nn.CrossEntropyLoss()(logits, torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    after = model.features[:9].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_optimizer_holds_only_trainable_parameters():
    model = build_architecture("efficientnet_b0", 2)
    freeze_early_blocks(model, frozen_block_count(model, 0.7))
    held = {id(p) for p in trainable_parameters(model)}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert not held & {id(p) for p in model.features[:6].parameters()}


def test_split_forward_equals_the_whole_model():
    model = build_architecture("mobilenet_v3_small", 2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(forward_from(model, 9, frozen_features(model, 9, x)), model(x), atol=1e-5)


@pytest.mark.parametrize("ratio", [0.7, 1.0])
@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_the_folded_frozen_prefix_computes_the_same_features(name, ratio):
    """Measured: at most 2.4e-6 apart on activations of scale 1-4 (float32 rounding), for every model."""
    torch.manual_seed(0)
    model = build_architecture(name, 2).eval()
    n_frozen = frozen_block_count(model, ratio)
    freeze_early_blocks(model, n_frozen)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine weights, as pretrained weights have
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    folded = fused_frozen_prefix(model, n_frozen)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    want = frozen_features(model, n_frozen, x)
    got = frozen_features(model, n_frozen, x, folded)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
