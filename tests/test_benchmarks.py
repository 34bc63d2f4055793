"""The benchmarks run (on tiny data): their numbers are for the README, never thresholds here."""

from __future__ import annotations

import pytest

import sys
import tempfile
from pathlib import Path

from tests.images import write_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_epoch  # noqa: E402
import bench_overhead  # noqa: E402


def test_epoch_benchmark_compares_plain_trainer_and_floor(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=8, n_val=4)
    summary = bench_epoch.main(["--data", str(data), "--img-size", "32", "--batch-size", "4",
                                "--epochs", "1", "--workers", "0"])
    assert summary["train_images"] == 16 and summary["val_images"] == 8
    for key in ("plain_epoch_s", "ours_epoch_s", "floor_s", "speedup_vs_plain", "ours_vs_floor"):
        assert summary[key] > 0, key
    assert 0 <= summary["ours_final_val_acc"] <= 1 and 0 <= summary["plain_final_val_acc"] <= 1


def test_benchmark_dataset_is_an_imagefolder_of_photo_crops(tmp_path):
    from harv_train.core.data import scan_dataset

    bench_epoch.write_benchmark_dataset(tmp_path / "bench", n_train=4, n_val=2)
    splits = scan_dataset(tmp_path / "bench")
    assert splits["train"].counts() == {"ProfA": 2, "Room1": 2}


@pytest.mark.slow
def test_overhead_benchmark_splits_a_real_run_into_its_parts(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    summary = bench_overhead.main(["--epochs", "2"])
    assert set(summary["fixed_parts_s"]) == {
        "start-up: imports, input checks (Prefect's temporary server boots meanwhile)",
        "flow start to end of epoch 1, minus the epoch's work",
        "after the last epoch: final checkpoint, MLflow logging incl. the model, evaluation",
        "Prefect artifacts, end of the flow run, exit",
    }
    assert summary["fixed_cost_s"] > 0 and summary["fixed_cost_with_running_server_s"] > 0
    assert "Prefect + MLflow overhead per epoch" in capsys.readouterr().out
    assert not list(tmp_path.iterdir()), "its working directory (data, runs, checkpoints) is removed"


def test_epoch_benchmark_keeps_its_working_directory_only_when_asked(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "data", n_train=2, n_val=2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    args = ["--data", str(data), "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0"]
    bench_epoch.main(args)
    assert not list(scratch.iterdir())
    bench_epoch.main(args + ["--keep"])
    assert len(list(scratch.iterdir())) == 1


def test_distributed_benchmark_holds_out_real_digits_for_validation(tmp_path):
    import bench_distributed

    from harv_train.core.data import scan_dataset

    splits = scan_dataset(bench_distributed.write_digits_dataset(tmp_path / "digits", 3, val_per_class=2))
    assert [len(splits["train"].classes), len(splits["val"].classes)] == [10, 10]
    assert [len(splits["train"].samples), len(splits["val"].samples)] == [30, 20]
    train_names = {p.name for p, _ in splits["train"].samples}
    assert not train_names & {p.name for p, _ in splits["val"].samples}  # held out


@pytest.mark.parametrize("layout", ["cells", "shift"])
def test_held_out_photos_share_no_pixel_with_training_or_each_other(layout):
    import numpy as np
    from bench_calibration import PHOTO_LAYOUTS, photo_regions

    assert layout in PHOTO_LAYOUTS
    crop = 48
    for h, w in [(300, 451), (427, 640), (512, 512), (872, 1000)]:  # the shapes of the photos it uses
        regions = photo_regions(h, w, layout, crop, np.random.default_rng(0))
        owner = np.zeros((h, w), dtype=np.int8)  # 0: no split's, else the split's number
        for number, (split, boxes) in enumerate(regions.items(), start=1):
            assert boxes, (split, h, w)
            for top, bottom, left, right in boxes:
                assert 0 <= top and bottom <= h and 0 <= left and right <= w
                assert bottom - top >= crop and right - left >= crop  # a crop fits inside
                assert set(np.unique(owner[top:bottom, left:right])) <= {0, number}, (split, h, w)
                owner[top:bottom, left:right] = number
