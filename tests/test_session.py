"""A run as restartable steps, without Prefect: epochs, best/last/final, resume, retries, early stopping."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harv_train.config import write_params_file
from harv_train.core import checkpoints as ckpt
from harv_train.core import session as session_module
from harv_train.core.checks import check_resumable, check_writable
from harv_train.core.early_stopping import EarlyStopping
from harv_train.core.run_state import build_optimizer
from harv_train.core.session import TrainingSession
from harv_train.errors import CheckpointError
from tests.trained import calibrated_weights

REPO = Path(__file__).resolve().parent.parent


def _train(cfg, epochs=None):
    session = TrainingSession(cfg)
    session.start(None)
    return [session.train_epoch(e, progress=False) for e in range(epochs or cfg.epochs)]


def _comparable(history):
    return [{k: getattr(m, k) for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")} for m in history]


def _archive(cfg):
    return ckpt.archive_previous_checkpoints(cfg.checkpoints_dir, (cfg.eval_dir, cfg.export_dir))


def test_epochs_write_last_best_and_final(make_config):
    cfg = make_config(epochs=2)
    history = _train(cfg)
    summary = TrainingSession(cfg).finish()
    assert [m.epoch for m in history] == [1, 2]
    for name in (ckpt.LAST, ckpt.BEST, ckpt.FINAL):
        state = torch.load(cfg.checkpoints_dir / name, weights_only=True)
        assert state["classes"] == ["cat", "dog"] and state["params"]["lr"] == cfg.lr
        assert {"model", "optimizer", "scheduler", "early_stopping", "best_val_acc"} <= set(state)
    assert summary.epoch == 2
    best = torch.load(cfg.checkpoints_dir / ckpt.BEST, weights_only=True)
    assert best["best_val_acc"] == max(m.val_acc for m in history)


_TRAIN_IN_A_NEW_PROCESS = """
import json, sys
from harv_train.config import load_config
from tests.trained import train_epochs
history = train_epochs(load_config(sys.argv[1]))
print(json.dumps([{k: getattr(m, k) for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")} for m in history]))
"""


def test_same_seed_gives_identical_metrics_in_two_separate_processes(make_config, tmp_path):
    """Nothing a process inherits from the test session (seeded generators, thread settings, warm
    caches) may be what makes two runs agree."""
    runs = []
    for name in ("a", "b"):
        params = tmp_path / f"{name}.yaml"
        write_params_file(make_config(artifacts_dir=str(tmp_path / name),
                                      pretrained=True, weights_path=str(calibrated_weights())), params)
        result = subprocess.run([sys.executable, "-c", _TRAIN_IN_A_NEW_PROCESS, str(params)], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_resume_in_a_fresh_process_state_equals_an_uninterrupted_run(make_config, tmp_path):
    """Including the learning-rate schedule: with lr_patience 1 the val loss of this tiny run stops
    improving, so the rate halves after epoch 3, which a resume after epoch 2 only reproduces when the
    scheduler's count of epochs without improvement comes back from last.pth."""
    schedule = dict(epochs=4, lr_patience=1, lr_factor=0.5)
    straight = _train(make_config(artifacts_dir=str(tmp_path / "straight"), **schedule))
    assert [m.lr for m in straight] == [0.001, 0.001, 0.001, 0.0005]
    cfg = make_config(artifacts_dir=str(tmp_path / "resumed"), **schedule)
    _train(cfg, epochs=2)
    fresh = TrainingSession(cfg)  # what a new process has: nothing but the files
    fresh.resume()
    rest = [fresh.train_epoch(e, progress=False) for e in (2, 3)]
    assert _comparable(rest) == _comparable(straight[2:])


def test_channels_last_false_trains_the_same_model(make_config, tmp_path):
    """The default memory format is channels_last; the plain one must compute the same run (to float
    rounding: the kernels differ)."""
    weights = dict(pretrained=True, weights_path=str(calibrated_weights()))  # outputs that depend on the input
    default = _train(make_config(artifacts_dir=str(tmp_path / "default"), **weights))
    cfg = make_config(artifacts_dir=str(tmp_path / "plain"), channels_last=False, **weights)
    session = TrainingSession(cfg)
    session.start(None)
    plain = [session.train_epoch(e, progress=False) for e in range(cfg.epochs)]
    first_conv = session.state.model.features[0][0].weight  # 3x3: the two layouts differ
    assert first_conv.is_contiguous() and not first_conv.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(_comparable(plain), _comparable(default), strict=True):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)


def test_a_failed_epoch_drops_the_live_state_and_the_retry_trains_from_last_pth(make_config, tmp_path, monkeypatch):
    """The live state is the session's until an epoch fails; then last.pth, as it is on disk, is the truth."""
    cfg = make_config(epochs=2)
    session = TrainingSession(cfg)
    session.start(None)
    session.train_epoch(0, progress=False)
    real = session_module.train_one_epoch

    def fails_after_stepping(*args, **kwargs):
        real(*args, **kwargs)  # the weights in memory have moved on...
        raise OSError("simulated I/O error")  # ...and the epoch fails

    monkeypatch.setattr(session_module, "train_one_epoch", fails_after_stepping)
    with pytest.raises(OSError):
        session.train_epoch(1, progress=False)
    assert session.state is None
    monkeypatch.setattr(session_module, "train_one_epoch", real)
    last = cfg.checkpoints_dir / ckpt.LAST
    state = ckpt.load_checkpoint(last)
    # The trainable head only: frozen weights are the run's by definition (its folded prefix and
    # cached validation features come from them).
    state["model"] = {k: v * 0.5 if k.startswith("classifier") else v for k, v in state["model"].items()}
    ckpt.save_checkpoint(state, last)
    replaced = last.read_bytes()
    retried = session.train_epoch(1, progress=False)
    last.write_bytes(replaced)
    fresh_process = TrainingSession(cfg).train_epoch(1, progress=False)
    assert _comparable([retried]) == _comparable([fresh_process])
    untouched = _train(make_config(epochs=2, artifacts_dir=str(tmp_path / "untouched")))[1]
    assert _comparable([untouched]) != _comparable([retried])  # the replaced weights did count


def test_an_epoch_already_in_the_checkpoint_is_not_trained_again(make_config):
    cfg = make_config(epochs=1)
    first = _train(cfg)[0]
    again = TrainingSession(cfg).train_epoch(0, progress=False)
    assert again == first  # read back from last.pth, not trained again


def test_resume_refuses_a_checkpoint_of_another_model(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    other = make_config(model_name="efficientnet_b0")
    with pytest.raises(CheckpointError, match="was trained as mobilenet_v3_small .* this run is efficientnet_b0"):
        check_resumable(other, ["cat", "dog"])


def test_resume_refuses_another_class_set(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    with pytest.raises(CheckpointError, match=r"on classes \['cat', 'dog'\].* on \['cat', 'cow'\]"):
        check_resumable(cfg, ["cat", "cow"])


def test_a_fresh_run_keeps_the_earlier_runs_checkpoints(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    old_best = (cfg.checkpoints_dir / ckpt.BEST).read_bytes()
    kept = _archive(cfg)
    assert kept is not None and (kept / ckpt.BEST).read_bytes() == old_best
    assert not cfg.checkpoints_dir.exists()


def test_kept_checkpoints_are_named_by_their_last_write_and_take_their_report_along(make_config):
    cfg = make_config(epochs=1)
    _train(cfg)
    for path in cfg.checkpoints_dir.glob("*.pth"):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    os.utime(cfg.checkpoints_dir / ckpt.LAST, (1_700_000_000, 1_700_000_000))
    check_writable(cfg.checkpoints_dir)  # touches the folder, not the checkpoints
    (cfg.checkpoints_dir.parent / "eval").mkdir()
    (cfg.checkpoints_dir.parent / "eval" / "report.json").write_text("{}")
    kept = _archive(cfg)
    assert kept.name == "checkpoints-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000))
    assert (kept / "eval" / "report.json").is_file() and not (cfg.checkpoints_dir.parent / "eval").exists()


def test_checkpoints_moved_aside_in_the_same_second_get_a_suffix_and_overwrite_nothing(tmp_path):
    directory = tmp_path / "checkpoints"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1_700_000_000))
    kept = []
    for run in range(3):
        ckpt.save_checkpoint({"epoch": run}, directory / ckpt.LAST)
        os.utime(directory / ckpt.LAST, (1_700_000_000, 1_700_000_000))  # all three last wrote in one second
        kept.append(ckpt.archive_previous_checkpoints(directory))
    assert [k.name for k in kept] == [f"checkpoints-{stamp}", f"checkpoints-{stamp}-2", f"checkpoints-{stamp}-3"]
    assert [torch.load(k / ckpt.LAST, weights_only=True)["epoch"] for k in kept] == [0, 1, 2]
    assert ckpt.archive_previous_checkpoints(directory) is None  # nothing left to move


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
    stops = [m.stop for m in _train(cfg, epochs=2)]
    assert stops == [False, True]


def test_optimizer_resumes_as_fused_adam_with_the_checkpoints_moments(make_config):
    """The fused kernel (same update, one pass over all weights) also for a state saved unfused."""
    cfg = make_config()
    model = torch.nn.Linear(3, 2)
    unfused = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model(torch.randn(4, 3)).sum().backward()
    unfused.step()
    optimizer = build_optimizer(cfg, model, unfused.state_dict())
    assert all(group["fused"] for group in optimizer.param_groups)
    moment = optimizer.state[model.weight]["exp_avg"].clone()
    assert torch.equal(moment, unfused.state[model.weight]["exp_avg"])
    optimizer.step()  # and it steps from there
    assert not torch.equal(optimizer.state[model.weight]["exp_avg"], moment)


def test_resume_names_the_params_that_differ_from_the_run(make_config, caplog):
    _train(make_config(epochs=1))
    with caplog.at_level(logging.INFO, logger="harv_train"):
        TrainingSession(make_config(epochs=3, registered_model_name="other")).resume()
    assert caplog.messages[-1] == "Params differ from the run being resumed: epochs 1 -> 3, registered_model_name None -> 'other'"


def test_a_retried_epoch_that_last_pth_already_holds_still_says_whether_to_stop(make_config):
    """A retry after last.pth was written (the task failed later) must not lose the early-stopping
    decision: the flow reads `stop` from every epoch's result."""
    cfg = make_config(epochs=6, early_stopping_patience=1, lr=1e-9)
    done = _train(cfg, epochs=2)
    again = TrainingSession(cfg).train_epoch(1, progress=False)
    assert again.stop and again == done[1]
