"""`compile: true` trains what eager mode trains, and keeps inductor's kernels in the cache folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from tests.trained import train_epochs


@pytest.fixture
def compile_available(monkeypatch, tmp_path):
    # The probe's kernels go under tmp_path; then TORCHINDUCTOR_CACHE_DIR is unset for the run to set,
    # and after the test it is as it was. Inductor also writes a precompiled C++ header (about 150 MB)
    # into /tmp/torchinductor_USER whatever that variable says: removed after the test if it was not
    # there before.
    headers = Path(default_cache_dir()) / "precompiled_headers"
    headers_before = headers.exists()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "probe-inductor"))
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as exc:  # no C++ compiler, an unsupported platform
        pytest.skip(f"torch.compile is not available here: {type(exc).__name__}: {exc}")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    yield
    if not headers_before:
        shutil.rmtree(headers, ignore_errors=True)


def test_compiled_training_matches_eager_within_float_tolerance(compile_available, make_config, tmp_path):
    cache = tmp_path / "cache"
    eager = train_epochs(make_config(epochs=2, cache_dir=str(cache), artifacts_dir=str(tmp_path / "eager")))
    compiled = train_epochs(make_config(epochs=2, cache_dir=str(cache), artifacts_dir=str(tmp_path / "compiled"),
                                        compile=True))
    # Inductor sums float32 in another order: 4e-5 apart after one epoch here, 2e-4 after two (Adam
    # carries the difference on). Dropout draws the same numbers (fallback_random).
    for e, c in zip(eager, compiled):
        assert (c.train_acc, c.val_acc) == (e.train_acc, e.val_acc)
        assert c.train_loss == pytest.approx(e.train_loss, rel=1e-3)
        assert c.val_loss == pytest.approx(e.val_loss, rel=1e-3)
    assert any((cache / "inductor").iterdir()), "inductor's kernels are kept in the cache folder"
