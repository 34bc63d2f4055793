"""The decoded-image cache on disk: its key, reuse, invalidation, atomic and concurrent builds, bad disks."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from harv_train.core import decoded_cache
from harv_train.core.data import decode_image, decode_split, load_dataset, scan_dataset
from harv_train.core.decoded_cache import CacheStore
from harv_train.errors import UserError
from tests.images import write_image_folder

REPO = Path(__file__).resolve().parent.parent


def _load(data: Path, cache: Path, size: int = 32, interpolation: str = "bilinear", **kwargs):
    return load_dataset(data, None, size, interpolation, kwargs.pop("cache_max_mb", 0), cache_dir=cache, **kwargs)


def _pixels(split) -> torch.Tensor:
    """Every image of the split as its batches deliver it."""
    return torch.cat([images for images, _ in split.batches(torch.arange(len(split)), 5)])


def _expected(split) -> torch.Tensor:
    return torch.stack([decode_image(p, split.img_size, split.interpolation) for p in split.paths])


def _stores(cache: Path) -> list[Path]:
    return sorted((cache / "decoded").iterdir())


def test_first_load_decodes_every_image_and_the_second_none(image_folder, tmp_path):
    cache = tmp_path / "cache"
    first = _load(image_folder, cache)
    assert (first["train"].decoded, first["val"].decoded) == (16, 8)
    again = _load(image_folder, cache)
    assert (again["train"].decoded, again["val"].decoded) == (0, 0)
    for split in ("train", "val"):
        assert torch.equal(_pixels(again[split]), _expected(again[split]))
    assert len(_stores(cache)) == 2  # one per split folder


def test_held_in_memory_and_read_from_disk_give_the_same_batches(image_folder, tmp_path):
    index = scan_dataset(image_folder)["train"]
    in_memory = decode_split(index, 32, "bilinear", cache_max_mb=64, cache_dir=tmp_path / "c")
    on_disk = decode_split(index, 32, "bilinear", cache_max_mb=0, cache_dir=tmp_path / "c")
    assert in_memory.cached and not on_disk.cached and on_disk.decoded == 0
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    for (a, la), (b, lb) in zip(in_memory.batches(order, 3), on_disk.batches(order, 3)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_the_key_holds_img_size_and_filter(image_folder, tmp_path):
    cache = tmp_path / "cache"
    _load(image_folder, cache)
    assert _load(image_folder, cache, size=40)["train"].decoded == 16
    assert _load(image_folder, cache, interpolation="bicubic")["train"].decoded == 16
    assert _load(image_folder, cache)["train"].decoded == 0
    assert len(_stores(cache)) == 6  # 2 splits x (32 bilinear, 40 bilinear, 32 bicubic)


def test_added_images_are_the_only_ones_decoded(image_folder, tmp_path):
    cache = tmp_path / "cache"
    _load(image_folder, cache)
    for i in range(3):
        shutil.copy(image_folder / "train" / "cat" / "cat_0.png", image_folder / "train" / "cat" / f"new_{i}.png")
    train = _load(image_folder, cache)["train"]
    assert (train.decoded, len(train)) == (3, 19)
    assert torch.equal(_pixels(train), _expected(train))


def test_a_rewritten_image_is_decoded_again(image_folder, tmp_path):
    cache = tmp_path / "cache"
    _load(image_folder, cache)
    target = image_folder / "train" / "dog" / "dog_2.png"
    Image.new("RGB", (40, 40), (1, 250, 3)).save(target)
    os.utime(target, ns=(1, 1))  # even with an older modification time: it differs from the recorded one
    train = _load(image_folder, cache)["train"]
    assert train.decoded == 1
    row = train.paths.index(target)
    assert _pixels(train)[row, :, 5, 5].tolist() == [1, 250, 3]
    assert torch.equal(_pixels(train), _expected(train))


def test_a_deleted_image_is_dropped_and_the_run_says_so(image_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    _load(image_folder, cache)
    (image_folder / "train" / "cat" / "cat_5.png").unlink()
    with caplog.at_level(logging.INFO, logger="harv_train"):
        train = _load(image_folder, cache)["train"]
    assert (train.decoded, len(train)) == (0, 15)
    [line] = [m for m in caplog.messages if "no longer in" in m]
    assert line.startswith("1 image(s) decoded earlier are no longer in ") and "cat/cat_5.png" in line
    [store] = [s for s in _stores(cache) if "train" in s.name]
    assert "cat/cat_5.png" not in json.loads((store / "index.json").read_text())["entries"]
    assert torch.equal(_pixels(train), _expected(train))


def test_unreadable_images_are_still_named_or_skipped(image_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    (image_folder / "train" / "cat" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"cannot read image .*empty\.jpg"):
        _load(image_folder, cache)
    for _ in range(2):  # the readable images were kept; the bad one is reported again, not cached
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="harv_train"):
            train = _load(image_folder, cache, skip_bad_images=True)["train"]
        assert len(train) == 16 and train.skipped == [str(image_folder / "train" / "cat" / "empty.jpg")]
        assert train.decoded == 0
        assert any(m.startswith("skipping unreadable image") for m in caplog.messages)


def test_parallel_decoding_writes_the_same_pixels(image_folder, tmp_path):
    serial = _load(image_folder, tmp_path / "serial", num_workers=0)["train"]
    parallel = _load(image_folder, tmp_path / "parallel", num_workers=2)["train"]
    assert parallel.decoded == 16
    assert torch.equal(_pixels(serial), _pixels(parallel))


_BUILD = """
import sys
from harv_train.core import decoded_cache
from harv_train.core.data import load_dataset
decoded_cache.CHUNK_MAX = 4
decoded_cache.COMMIT_EVERY_S = float(sys.argv[3])
splits = load_dataset(sys.argv[1], None, 32, "bilinear", 0, cache_dir=sys.argv[2], num_workers=int(sys.argv[4]))
print(splits["train"].decoded, splits["val"].decoded)
"""


def _build(data: Path, cache: Path, commit_every_s: float = 0.0, workers: int = 0, failpoint: str | None = None,
           wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "HARV_TRAIN_FAILPOINT"}
    if failpoint:
        env["HARV_TRAIN_FAILPOINT"] = failpoint
    cmd = [sys.executable, "-c", _BUILD, str(data), str(cache), str(commit_every_s), str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.communicate(timeout=300) + (proc.returncode,) if wait else proc


@pytest.mark.parametrize("commit_every_s", [0.0, 3600.0], ids=["committed-chunks", "nothing-committed"])
def test_a_build_killed_midway_leaves_nothing_half_written_in_use(image_folder, tmp_path, commit_every_s):
    cache = tmp_path / "cache"
    # SIGKILL after the 3rd chunk of 4 images is written, before the index names it.
    _, err, code = _build(image_folder, cache, commit_every_s, failpoint="cache_write:3")
    assert code == -9, err
    [store] = _stores(cache)
    entries = json.loads((store / "index.json").read_text())["entries"] if (store / "index.json").exists() else {}
    assert len(entries) == (8 if commit_every_s == 0 else 0)  # the two committed chunks, or nothing
    pixels = decoded_cache.PixelFile(next(store.glob("pixels-*.u8")), 32)
    for key, (_, _, slot) in entries.items():  # what the index names is whole
        assert np.array_equal(pixels.read(np.array([slot]))[0], decode_image(image_folder / "train" / key, 32, "bilinear").numpy())
    out, err, code = _build(image_folder, cache)
    assert code == 0, err
    assert out.split() == [str(16 - len(entries)), "8"]  # the next build decodes exactly what is missing
    rebuilt = _load(image_folder, cache)["train"]
    clean = _load(image_folder, tmp_path / "clean")["train"]
    assert rebuilt.decoded == 0 and torch.equal(_pixels(rebuilt), _pixels(clean))


def test_two_processes_building_at_once_decode_each_image_once(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=40, n_val=2, size=64)
    cache = tmp_path / "cache"
    procs = [_build(data, cache, workers=1, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    decoded = [tuple(map(int, out.split())) for out, _ in outputs]
    assert sum(d[0] for d in decoded) == 80 and sum(d[1] for d in decoded) == 4
    train = _load(data, cache)["train"]
    assert train.decoded == 0 and torch.equal(_pixels(train), _expected(train))


def test_a_cache_dir_that_cannot_be_written_is_a_one_line_error(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as err:
        _load(image_folder, blocker / "cache")
    message = str(err.value)
    assert message.startswith(f"cannot write the decoded-image cache in {blocker / 'cache'} (Not a directory)")
    assert message.endswith("set cache_dir to a writable folder") and "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_dir_is_a_one_line_error(image_folder, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    try:
        with pytest.raises(UserError, match=r"cannot write the decoded-image cache in .*\(Permission denied\)"):
            _load(image_folder, cache)
    finally:
        cache.chmod(0o700)


def test_a_complete_cache_is_read_without_write_access(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _load(image_folder, cache)

    def no_lock(self):
        raise AssertionError("a complete store needs no lock")

    monkeypatch.setattr(CacheStore, "_locked", no_lock)
    assert _load(image_folder, cache)["train"].decoded == 0


def test_a_disk_too_small_for_the_cache_is_a_one_line_error_before_decoding(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(decoded_cache.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**12, used=10**12, free=1000))
    with pytest.raises(UserError) as err:
        _load(image_folder, tmp_path / "cache")
    assert str(err.value).startswith("not enough free disk space for the decoded-image cache in ")
    assert "set cache_dir to a folder on a larger disk" in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache").rglob("index.json"))


def test_a_disk_that_fills_up_while_building_keeps_only_whole_images(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    writes = {"n": 0}
    real = decoded_cache._pwrite_all

    def filling(fd, data, offset):
        writes["n"] += 1
        if writes["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    monkeypatch.setattr(decoded_cache, "_pwrite_all", filling)
    monkeypatch.setattr(decoded_cache, "CHUNK_MAX", 1)
    with pytest.raises(UserError, match="^not enough free disk space for the decoded-image cache"):
        _load(image_folder, cache)
    monkeypatch.setattr(decoded_cache, "_pwrite_all", real)
    train = _load(image_folder, cache)["train"]
    assert train.decoded == 11  # the 5 images written before the disk filled were kept
    assert torch.equal(_pixels(train), _expected(train))


def test_mostly_dead_slots_are_compacted_and_open_readers_keep_reading(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(decoded_cache, "COMPACT_MIN_BYTES", 0)
    cache = tmp_path / "cache"
    before = _load(image_folder, cache)["train"]
    old_pixels = _pixels(before)
    for path in before.paths[:12]:  # 12 of 16 rewritten: 12 dead slots, fewer than the 16 live ones
        Image.new("RGB", (40, 40), (9, 9, 9)).save(path)
    after = _load(image_folder, cache)["train"]
    [store] = [s for s in _stores(cache) if "train" in s.name]
    assert [p.name for p in store.glob("pixels-*")] == ["pixels-0.u8"]  # 12 dead of 28: not yet
    for path in before.paths[:12]:
        Image.new("RGB", (40, 40), (7, 7, 7)).save(path)
        os.utime(path, ns=(5, 5))
    latest = _load(image_folder, cache)["train"]
    assert [p.name for p in store.glob("pixels-*")] == ["pixels-1.u8"]  # 24 dead of 40: copied
    assert json.loads((store / "index.json").read_text())["slots"] == 16
    assert torch.equal(_pixels(latest), _expected(latest))
    assert torch.equal(_pixels(before), old_pixels)  # its file is unlinked, still open
    assert after.decoded == 12 and latest.decoded == 12


def test_the_cache_command_lists_and_clears(image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    _load(image_folder, cache)
    (cache / "inductor").mkdir()
    (cache / "mine.txt").write_text("not ours")
    assert decoded_cache.main(["list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "16 images  32px" in out and "in 2 store(s)" in out
    assert decoded_cache.main(["clear", "--cache-dir", str(cache)]) == 0
    assert sorted(p.name for p in cache.iterdir()) == ["mine.txt"]


def test_prune_removes_stores_of_folders_that_are_gone(tmp_path):
    cache = tmp_path / "cache"
    kept = write_image_folder(tmp_path / "kept")
    gone = write_image_folder(tmp_path / "gone")
    _load(kept, cache)
    _load(gone, cache)
    shutil.rmtree(gone)
    assert decoded_cache.main(["prune", "--cache-dir", str(cache)]) == 0
    assert [json.loads((s / "index.json").read_text())["root"] for s in _stores(cache)] == [
        str(kept / "train"), str(kept / "val")]


def test_the_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HARV_TRAIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decoded_cache.resolve_cache_dir(None) == tmp_path / "xdg" / "harv-train"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert decoded_cache.resolve_cache_dir(None) == Path.home() / ".cache" / "harv-train"
    monkeypatch.setenv("HARV_TRAIN_CACHE_DIR", str(tmp_path / "mine"))
    assert decoded_cache.resolve_cache_dir(None) == tmp_path / "mine"
    assert decoded_cache.resolve_cache_dir("~/x") == Path.home() / "x"


def test_a_truncated_pixel_file_is_noticed_and_rebuilt(image_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    _load(image_folder, cache)
    [store] = [s for s in _stores(cache) if "train" in s.name]
    pixels = store / "pixels-0.u8"
    os.truncate(pixels, pixels.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="harv_train"):
        train = _load(image_folder, cache)["train"]
    assert train.decoded == 16 and any("lost pixels its index names" in m for m in caplog.messages)
    assert torch.equal(_pixels(train), _expected(train))
