"""benchmarks/bench_data.py runs end to end on tiny sizes and removes what it wrote (numbers: docs only)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_data  # noqa: E402


def test_data_benchmark_measures_each_size_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    summary = bench_data.main(["--sizes", "8", "24", "--val-images", "4", "--sample-batches", "1", "--epochs", "2",
                               "--decode-sample", "8", "--drop-page-cache"])
    rows = summary["rows"]
    assert [r["train_images"] for r in rows] == [8, 24]
    for r in rows:
        for key in ("warm_ms_per_image", "cold_ms_per_image", "plain_ms_per_image", "decode_img_s",
                    "plain_decode_img_s", "peak_rss_mib"):
            assert r[key] > 0, key
    assert rows[0]["warm_vs_smallest"] == 1.0 and rows[1]["warm_vs_smallest"] > 0
    assert rows[1]["from_disk_ms_per_image"] > 0
    assert not list(tmp_path.iterdir()), "its working directory (JPEGs, caches, runs) is removed"
