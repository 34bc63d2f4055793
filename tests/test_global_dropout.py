"""Dropout and stochastic depth in a data-parallel run: each rank keeps its rows of the global batch's mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from harv_train.core.global_dropout import GlobalDropout, GlobalStochasticDepth, draw_global_masks
from harv_train.core.models import build_model

WORLD = 2


@pytest.mark.parametrize("plain, global_layer, shape", [
    (nn.Dropout(0.3), GlobalDropout, (16, 40)),
    (StochasticDepth(0.3, "row"), GlobalStochasticDepth, (16, 8, 4, 4)),
])
def test_each_rank_gets_its_rows_of_one_process_mask(plain, global_layer, shape):
    """Every rank seeded alike (as every rank of an epoch is), taking samples r::world of the global batch:
    together they compute exactly what one process computes on the whole batch."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    one_process = plain.train()(x)
    for rank in range(WORLD):
        torch.manual_seed(7)
        mine = global_layer(0.3, rank, WORLD).train()(x[rank::WORLD])
        assert torch.equal(mine, one_process[rank::WORLD])
    torch.manual_seed(7)  # what plain layers on the ranks did: the same rows dropped on every rank
    assert not torch.equal(plain(x[1::WORLD]), one_process[1::WORLD])


def test_the_models_dropout_layers_are_replaced_and_the_state_dict_kept():
    model = build_model("efficientnet_lite0", 3, pretrained=False)
    state = model.state_dict()
    expected = sum(type(m) is nn.Dropout or type(m) is StochasticDepth for m in model.modules())
    assert draw_global_masks(model, 1, WORLD) == expected == 17  # the head's dropout, 16 residual branches
    assert draw_global_masks(model, 1, WORLD) == 0  # idempotent
    assert list(model.state_dict()) == list(state)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = build_model("efficientnet_lite0", 3, pretrained=False)
        reference.load_state_dict(state)
        assert torch.equal(model(x), reference.eval()(x))  # in eval mode nothing is dropped
