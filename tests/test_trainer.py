"""A run as restartable steps, without Prefect: epochs, best/last/final, resume, early stopping."""

from __future__ import annotations

import os
import time

import pytest
import torch

from harv_train.core import checkpoints as ckpt
from harv_train.core import trainer
from harv_train.core.early_stopping import EarlyStopping
from harv_train.errors import CheckpointError

quiet = lambda _: None  # noqa: E731


def _train(cfg, epochs=None):
    splits = trainer.load_data(cfg, quiet)
    trainer.start_run(cfg, splits["train"].classes, None, quiet)
    return [trainer.run_epoch(cfg, e, quiet, progress=False) for e in range(epochs or cfg.epochs)]


def _comparable(history):
    return [{k: m[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")} for m in history]


def test_epochs_write_last_best_and_final(make_config):
    cfg = make_config(epochs=2)
    history = _train(cfg)
    summary = trainer.finish_run(cfg)
    assert [m["epoch"] for m in history] == [1, 2]
    for name in (ckpt.LAST, ckpt.BEST, ckpt.FINAL):
        state = torch.load(cfg.checkpoints_dir / name, weights_only=True)
        assert state["classes"] == ["cat", "dog"] and state["params"]["lr"] == cfg.lr
        assert {"model", "optimizer", "scheduler", "early_stopping", "best_val_acc"} <= set(state)
    assert summary["epoch"] == 2
    best = torch.load(cfg.checkpoints_dir / ckpt.BEST, weights_only=True)
    assert best["best_val_acc"] == max(m["val_acc"] for m in history)


def test_same_seed_gives_identical_metrics(make_config, tmp_path):
    a = _train(make_config(artifacts_dir=str(tmp_path / "a")))
    b = _train(make_config(artifacts_dir=str(tmp_path / "b")))
    assert _comparable(a) == _comparable(b)


def test_resume_in_a_fresh_process_state_equals_an_uninterrupted_run(make_config, tmp_path):
    straight = _train(make_config(artifacts_dir=str(tmp_path / "straight"), epochs=3))
    cfg = make_config(artifacts_dir=str(tmp_path / "resumed"), epochs=3)
    _train(cfg, epochs=1)
    trainer._session = None  # what a new process has: nothing but the files
    trainer.resume_run(cfg, ["cat", "dog"], quiet)
    rest = [trainer.run_epoch(cfg, e, quiet, progress=False) for e in (1, 2)]
    assert _comparable(rest) == _comparable(straight[1:])


def test_an_epoch_trains_from_last_pth_as_it_is_on_disk_even_after_this_process_wrote_it(make_config, tmp_path):
    """The process skips re-reading its own last write, but never past a file someone replaced."""
    cfg = make_config(epochs=2)
    _train(cfg, epochs=1)
    last = cfg.checkpoints_dir / ckpt.LAST
    state = ckpt.load_checkpoint(last)
    # The trainable head only: frozen weights are the run's by definition (its folded prefix and
    # cached validation features come from them).
    state["model"] = {k: v * 0.5 if k.startswith("classifier") else v for k, v in state["model"].items()}
    ckpt.save_checkpoint(state, last)
    replaced = last.read_bytes()
    this_process = trainer.run_epoch(cfg, 1, quiet, progress=False)
    last.write_bytes(replaced)
    trainer._session = None  # a new process: nothing but the file
    fresh_process = trainer.run_epoch(cfg, 1, quiet, progress=False)
    assert _comparable([this_process]) == _comparable([fresh_process])
    untouched = _train(make_config(epochs=2, artifacts_dir=str(tmp_path / "untouched")))[1]
    assert _comparable([untouched]) != _comparable([this_process])  # the replaced weights did count


def test_an_epoch_already_in_the_checkpoint_is_not_trained_again(make_config):
    cfg = make_config(epochs=1)
    first = _train(cfg)[0]
    again = trainer.run_epoch(cfg, 0, quiet, progress=False)
    assert again["skipped"] and again["val_acc"] == first["val_acc"]


def test_resume_refuses_a_checkpoint_of_another_model(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    other = make_config(model_name="efficientnet_b0")
    with pytest.raises(CheckpointError, match="was trained as mobilenet_v3_small .* this run is efficientnet_b0"):
        trainer.resume_run(other, ["cat", "dog"], quiet)


def test_resume_refuses_another_class_set(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    with pytest.raises(CheckpointError, match=r"on classes \['cat', 'dog'\].* on \['cat', 'cow'\]"):
        trainer.resume_run(cfg, ["cat", "cow"], quiet)


def test_a_fresh_run_keeps_the_earlier_runs_checkpoints(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    old_best = (cfg.checkpoints_dir / ckpt.BEST).read_bytes()
    kept = trainer.archive_previous_checkpoints(cfg, quiet)
    assert kept is not None and (kept / ckpt.BEST).read_bytes() == old_best
    assert not cfg.checkpoints_dir.exists()


def test_kept_checkpoints_are_named_by_their_last_write_and_take_their_report_along(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    for path in cfg.checkpoints_dir.glob("*.pth"):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    os.utime(cfg.checkpoints_dir / ckpt.LAST, (1_700_000_000, 1_700_000_000))
    trainer.check_writable(cfg.checkpoints_dir)  # touches the folder, not the checkpoints
    (cfg.checkpoints_dir.parent / "eval").mkdir()
    (cfg.checkpoints_dir.parent / "eval" / "report.json").write_text("{}")
    kept = trainer.archive_previous_checkpoints(cfg, quiet)
    assert kept.name == "checkpoints-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000))
    assert (kept / "eval" / "report.json").is_file() and not (cfg.checkpoints_dir.parent / "eval").exists()


def test_an_equal_accuracy_with_a_lower_loss_is_a_better_model():
    stopper = EarlyStopping(patience=2)
    assert [stopper.step(a, l) for a, l in ((1.0, 0.5), (1.0, 0.3), (1.0, 0.4), (0.9, 0.1))] == [True, True, False, False]
    assert stopper.should_stop and (stopper.best, stopper.best_loss) == (1.0, 0.3)


def test_early_stopping_counts_epochs_without_a_better_accuracy():
    stopper = EarlyStopping(patience=2)
    assert [stopper.step(v) for v in (0.5, 0.6, 0.6, 0.55)] == [True, True, False, False]
    assert stopper.should_stop
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop and restored.best == 0.6


def test_early_stopping_ends_training(make_config):
    cfg = make_config(epochs=6, early_stopping_patience=1, lr=1e-9)
    splits = trainer.load_data(cfg, quiet)
    trainer.start_run(cfg, splits["train"].classes, None, quiet)
    stops = [trainer.run_epoch(cfg, e, quiet, progress=False)["stop"] for e in range(2)]
    assert stops == [False, True]


def test_optimizer_resumes_as_fused_adam_with_the_checkpoints_moments(make_config):
    """The fused kernel (same update, one pass over all weights) also for a state saved unfused."""
    cfg = make_config()
    model = torch.nn.Linear(3, 2)
    unfused = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model(torch.randn(4, 3)).sum().backward()
    unfused.step()
    optimizer = trainer.build_optimizer(cfg, model, unfused.state_dict())
    assert all(group["fused"] for group in optimizer.param_groups)
    moment = optimizer.state[model.weight]["exp_avg"].clone()
    assert torch.equal(moment, unfused.state[model.weight]["exp_avg"])
    optimizer.step()  # and it steps from there
    assert not torch.equal(optimizer.state[model.weight]["exp_avg"], moment)


def test_resume_names_the_params_that_differ_from_the_run(make_config):
    _train(make_config(epochs=1))
    logged: list[str] = []
    trainer.resume_run(make_config(epochs=3, registered_model_name="other"), ["cat", "dog"], logged.append)
    assert logged[-1] == "Params differ from the run being resumed: epochs 1 -> 3, registered_model_name None -> 'other'"
