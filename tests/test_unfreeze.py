"""unfreeze: staged unfreezing at given epochs, with the optimizer, the frozen-prefix cache and resume handled."""

from __future__ import annotations

import pytest
import torch

from harv_train.core import checkpoints as ckpt
from harv_train.core.freezing import feature_blocks
from harv_train.core.runtime import resolve_device
from harv_train.core.run_state import RunState
from harv_train.core.session import TrainingSession
from harv_train.errors import ConfigError

RECIPE = dict(schedule="cosine", warmup_epochs=1, backbone_lr_mult=0.5, ema_decay=0.9)


def _run(cfg, epochs):
    session = TrainingSession(cfg)
    session.start(None)
    return [session.train_epoch(e, progress=False) for e in range(epochs)]


def _frozen_after_each_epoch(cfg) -> list[tuple[int, list[bool]]]:
    """Per epoch of a whole run: last.pth's n_frozen, and which stages of the live model were trainable."""
    session = TrainingSession(cfg)
    session.start(None)
    after = []
    for epoch in range(cfg.epochs):
        session.train_epoch(epoch, progress=False)
        trainable = [all(p.requires_grad for p in s.parameters()) for s in feature_blocks(session.state.model)]
        after.append((ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)["n_frozen"], trainable))
    return after


def test_blocks_unfreeze_at_the_epochs_the_schedule_names(make_config):
    cfg = make_config(epochs=3, freeze_ratio=0.7, unfreeze={2: 0.3, 3: 0.0})  # 13 stages: 9, then 3, then 0 frozen
    after = _frozen_after_each_epoch(cfg)
    for n_frozen, trainable in after:
        assert trainable == [i >= n_frozen for i in range(13)]
    assert [n_frozen for n_frozen, _ in after] == [9, 3, 0]


def test_a_modern_run_trains_half_its_frozen_stages_too_in_its_second_half(make_config):
    cfg = make_config(recipe="modern", epochs=6)  # freeze_ratio 0.7 of 13 stages: 9 frozen, then 0.35: 4
    assert [n_frozen for n_frozen, _ in _frozen_after_each_epoch(cfg)] == [9, 9, 9, 4, 4, 4]


def test_the_optimizer_keeps_what_trained_and_the_schedule_goes_on(make_config):
    cfg = make_config(epochs=4, freeze_ratio=0.7, unfreeze={3: 0.3}, **RECIPE)
    session = TrainingSession(cfg)
    session.start(None)
    for epoch in range(2):
        session.train_epoch(epoch, progress=False)
    state = session.state
    head = state.model.classifier[-1].weight
    trained = state.optimizer.state[head]["exp_avg"].clone()
    lrs = [g["lr"] for g in state.optimizer.param_groups]
    newly = next(feature_blocks(state.model)[5].parameters())
    state.unfreeze(3)
    assert torch.equal(state.optimizer.state[head]["exp_avg"], trained)  # Adam's moments kept
    assert newly.requires_grad and newly not in state.optimizer.state  # fresh moments for the new blocks
    assert any(newly is p for p in state.optimizer.param_groups[1]["params"])  # in the backbone's group
    assert [g["lr"] for g in state.optimizer.param_groups] == pytest.approx(lrs)  # lr x backbone_lr_mult, where the schedule is
    assert state.scheduler.base_lrs == pytest.approx([cfg.lr, cfg.lr * 0.5])
    assert any(n.startswith("features.5.") for n in state.ema.names)  # the average covers the new blocks


def test_a_run_resumed_after_unfreezing_computes_what_an_uninterrupted_one_does(make_config, tmp_path):
    """The uninterrupted session keeps its frozen-prefix copy and val features in memory across the
    unfreezing, the resumed one builds them from last.pth: equal results prove both are right."""
    whole = make_config(epochs=4, freeze_ratio=0.7, unfreeze={2: 0.3, 4: 0.0},
                        artifacts_dir=str(tmp_path / "whole"), **RECIPE)
    uninterrupted = _run(whole, 4)
    cut = make_config(epochs=4, freeze_ratio=0.7, unfreeze={2: 0.3, 4: 0.0}, artifacts_dir=str(tmp_path / "cut"),
                      **RECIPE)
    _run(cut, 2)
    resumed = [TrainingSession(cut).train_epoch(e, progress=False) for e in (2, 3)]  # new sessions, as after a crash
    assert [(m.val_loss, m.train_loss, m.lr) for m in resumed] == [(m.val_loss, m.train_loss, m.lr)
                                                                  for m in uninterrupted[2:]]
    a = ckpt.load_checkpoint(whole.checkpoints_dir / ckpt.LAST)
    b = ckpt.load_checkpoint(cut.checkpoints_dir / ckpt.LAST)
    assert a["n_frozen"] == b["n_frozen"] == 0
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_restored_state_has_the_unfrozen_optimizer_groups(make_config):
    cfg = make_config(epochs=2, freeze_ratio=0.7, unfreeze={2: 0.3}, backbone_lr_mult=0.5)
    _run(cfg, 2)
    state = RunState.restore(cfg, cfg.checkpoints_dir / ckpt.LAST, resolve_device("cpu"))
    assert state.n_frozen == 3
    trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in state.optimizer.param_groups for p in g["params"]) == trainable


@pytest.mark.parametrize("schedule, says", [
    ({1: 0.3}, "epoch >= 2"),
    ({3: 0.9}, "below the one before it (0.7)"),
    ({3: 0.3, 5: 0.5}, "below the one before it (0.3)"),
])
def test_a_schedule_that_does_not_unfreeze_is_refused_in_one_line(make_config, schedule, says):
    with pytest.raises(ConfigError, match=r"unfreeze") as refused:
        make_config(unfreeze=schedule)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_the_disk_space_check_counts_the_most_weights_the_schedule_trains(make_config):
    from harv_train.core.checks import estimated_checkpoint_bytes

    plain = estimated_checkpoint_bytes(make_config(), 2)
    staged = estimated_checkpoint_bytes(make_config(unfreeze={3: 0.0}), 2)
    averaged = estimated_checkpoint_bytes(make_config(unfreeze={3: 0.0}, ema_decay=0.9), 2)
    assert plain < staged < averaged
