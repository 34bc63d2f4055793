"""Checkpoints are plain dicts, written atomically, and refused with a clear message when not ours."""

from __future__ import annotations

import stat

import pytest
import torch

from harv_train.core import checkpoints as ckpt
from harv_train.errors import CheckpointError

STATE = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "epoch": 2, "best_val_acc": 0.75,
         "classes": ["a", "b"], "params": {"lr": 0.1}}


def test_checkpoint_loads_with_weights_only(tmp_path):
    ckpt.save_checkpoint(STATE, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.ones(3))


def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "best_model.pth"
    ckpt.save_checkpoint(STATE, path)

    def explode(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        ckpt.save_checkpoint({**STATE, "epoch": 3}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.pth"]


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not a harv-train checkpoint"):
        ckpt.load_checkpoint(tmp_path / "other.pth")


def test_garbage_is_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00not torch")
    with pytest.raises(CheckpointError, match="cannot load checkpoint .* damaged"):
        ckpt.load_checkpoint(tmp_path / "junk.pth")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "none.pth")


def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path):
    ckpt.save_checkpoint({"epoch": 1}, tmp_path / "c.pth")
    (tmp_path / "plain").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "c.pth").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
