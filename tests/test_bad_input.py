"""Bad input that the issue lists one by one: each either works (and says so) or is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.trained import train_epochs
from harv_train.config import VALID_KEYS, DistributedConfig, TrainConfig, config_from_mapping
from harv_train.core.data import load_dataset
from harv_train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
# Nested mappings use distributed's keys too, so its section gets values to check, not only unknown keys.
section_keys = st.one_of(st.sampled_from(tuple(DistributedConfig.model_fields)), st.text(max_size=8))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(section_keys, inner, max_size=3), max_leaves=8)
keys = st.one_of(st.sampled_from(VALID_KEYS), st.text(max_size=12))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, yaml_values, max_size=6))
def test_any_mapping_either_validates_or_gives_a_one_line_error(raw):
    try:
        cfg = config_from_mapping(raw)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
    else:
        assert isinstance(cfg, TrainConfig)
        assert config_from_mapping(cfg.to_dict()) == cfg  # what a run writes to params.yaml reads back


@settings(max_examples=100, deadline=None)
@given(st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=3)))
def test_a_document_that_is_not_a_mapping_is_a_one_line_error(raw):
    with pytest.raises(ConfigError, match="must be a mapping") as err:
        config_from_mapping(raw)
    assert "\n" not in str(err.value)


def test_truncated_jpeg_is_named(image_folder):
    bad = image_folder / "val" / "dog" / "half.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(bad)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*half\.jpg"):
        load_dataset(image_folder, None, 32, "bilinear", 64)


def test_a_class_with_a_single_image_trains(make_config, tmp_path):
    from tests.images import write_image_folder

    data = write_image_folder(tmp_path / "single", n_train=1, n_val=1)
    cfg = make_config(data_dir=str(data), epochs=1, batch_size=16)
    [metrics] = train_epochs(cfg)
    assert metrics.train_batches == 1 and 0 <= metrics.val_acc <= 1


def test_a_10000x10000_jpeg_decodes_without_a_memory_blowup(tmp_path):
    """Decoding it whole would take 300 MB; JPEG draft mode decodes it at 1/8 scale."""
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (10000, 10000), (10, 200, 30)).save(path, quality=50)
    probe = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from harv_train.core.data import decode_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x = decode_image(Path(sys.argv[1]), 224, 'bilinear')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(tuple(x.shape), (after - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    shape, grown_mb = " ".join(out[:-1]), int(out[-1])
    assert shape == "(3, 224, 224)"
    assert grown_mb < 100  # the full image alone is 286 MiB
