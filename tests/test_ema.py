"""ema_decay: an exponential moving average of the trainable weights, validated, saved and resumed."""

from __future__ import annotations

import pytest
import torch

from harv_train.core import checkpoints as ckpt
from harv_train.core.ema import WeightEma, averaged_names
from harv_train.core.freezing import feature_blocks, freeze_early_blocks
from harv_train.core.models import build_architecture
from harv_train.core.session import TrainingSession
from harv_train.reporting.evaluation import load_eval_split, load_trained_model, predict_split


def _model(n_frozen: int):
    torch.manual_seed(0)
    model = build_architecture("mobilenet_v3_small", 2)
    freeze_early_blocks(model, n_frozen)
    return model


def test_the_average_moves_towards_the_weights_with_the_warmed_up_decay():
    model = _model(9)
    ema = WeightEma(model, 9, decay=0.99)
    before = {k: t.clone() for k, t in ema.average.items()}
    head = model.classifier[-1].weight
    with torch.no_grad():
        for step in range(3):
            head.add_(1.0)
            ema.update(model)
            d = min(0.99, (1 + step) / (10 + step))  # 0.1, 0.1818, 0.25: far below 0.99 at first
            before = {k: d * t + (1 - d) * model.state_dict()[k] for k, t in before.items()}
    key = "classifier.3.weight"
    assert torch.allclose(ema.average[key], before[key], atol=1e-6)
    assert not torch.allclose(ema.average[key], head)  # an average, not a copy


def test_only_the_trainable_part_is_averaged_and_counters_are_not():
    model = _model(9)
    names = averaged_names(model, 9)
    frozen = {f"features.{i}." for i in range(9)}
    assert names and not [n for n in names if any(n.startswith(f) for f in frozen)]
    assert "features.9.block.0.1.running_mean" in names  # trainable BatchNorm statistics are averaged
    assert not [n for n in names if n.endswith("num_batches_tracked")]
    assert len(feature_blocks(model)) == 13


def test_the_average_is_saved_and_loaded():
    model = _model(9)
    ema = WeightEma(model, 9, decay=0.9)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(2)
    ema.update(model)
    other = WeightEma(_model(9), 9, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(other.average[k], ema.average[k]) for k in ema.names)
    with pytest.raises(ValueError, match="covers other weights"):
        WeightEma(_model(5), 5, decay=0.9).load_state_dict(ema.state_dict())


def _train(cfg, epochs):
    session = TrainingSession(cfg)
    session.start(None)
    return session, [session.train_epoch(e, progress=False) for e in range(epochs)]


def test_validation_and_best_model_use_the_average_and_last_pth_keeps_the_live_weights(make_config):
    cfg = make_config(epochs=2, ema_decay=0.9, freeze_ratio=0.5)
    session, history = _train(cfg, 2)
    state = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
    # "model" is the average, "ema" the live weights it came from: they differ after 2 epochs.
    key = "classifier.3.weight"
    assert state["ema"]["updates"] == sum(m.train_batches for m in history)
    assert not torch.equal(state["model"][key], state["ema"]["live"][key])
    # The served model is the validated one: evaluating best_model.pth gives the logged val loss.
    best = cfg.checkpoints_dir / ckpt.BEST
    saved, model = load_trained_model(best)
    predictions = predict_split(model, load_eval_split(saved, cfg.data_dir + "/val"), saved["mean"], saved["std"])
    logits, labels = torch.from_numpy(predictions.logits), torch.from_numpy(predictions.labels)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert loss == pytest.approx(history[saved["epoch"] - 1].val_loss, rel=1e-4)


def test_a_resumed_run_with_ema_computes_what_an_uninterrupted_one_does(make_config, tmp_path):
    whole = make_config(epochs=2, ema_decay=0.9, artifacts_dir=str(tmp_path / "whole"))
    _, uninterrupted = _train(whole, 2)
    cut = make_config(epochs=2, ema_decay=0.9, artifacts_dir=str(tmp_path / "cut"))
    _train(cut, 1)
    resumed = TrainingSession(cut).train_epoch(1, progress=False)  # a new process, as it were
    assert resumed.val_loss == uninterrupted[1].val_loss
    a = ckpt.load_checkpoint(whole.checkpoints_dir / ckpt.LAST)
    b = ckpt.load_checkpoint(cut.checkpoints_dir / ckpt.LAST)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["live"][k], b["ema"]["live"][k]) for k in a["ema"]["live"])


def test_without_ema_decay_the_checkpoint_has_no_average(make_config):
    cfg = make_config(epochs=1)
    _train(cfg, 1)
    assert "ema" not in ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
