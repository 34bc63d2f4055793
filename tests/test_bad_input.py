"""Bad input that the issue lists one by one: each either works (and says so) or is a one-line error."""

from __future__ import annotations

import math
import subprocess
import sys
import typing
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


def _valid_value(field) -> st.SearchStrategy:
    """Values a param's type and bounds accept (read from its pydantic field), or its default."""
    annotation, bounds = field.annotation, {type(m).__name__: m for m in field.metadata}
    pattern = next((m.pattern for m in field.metadata if getattr(m, "pattern", None)), None)
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = getattr(bounds.get("Ge"), "ge", 0)
        return st.integers(low, getattr(bounds.get("Le"), "le", low + 500))
    if annotation is float:
        low = getattr(bounds.get("Ge"), "ge", None)
        low = getattr(bounds.get("Gt"), "gt", 0.0) if low is None else low
        high = getattr(bounds.get("Le"), "le", None)
        high = getattr(bounds.get("Lt"), "lt", 10.0) if high is None else high
        return st.floats(low, high, exclude_min="Gt" in bounds, exclude_max="Lt" in bounds)
    if annotation is str and pattern:
        return st.from_regex(pattern, fullmatch=pattern.startswith("^")).filter(lambda v: "\n" not in v)
    if field.default is None:  # the optional lists and paths: null, or a plain value
        return st.one_of(st.none(), st.just(["a", "b"]), st.just("some/path"))
    if typing.get_origin(annotation) is dict:  # unfreeze: epoch -> freeze_ratio, in order or not
        return st.dictionaries(st.integers(0, 12), st.floats(0.0, 1.0), max_size=3)
    return st.just(field.get_default(call_default_factory=True))


# Mappings of valid values, some given in the wrong kind: most validate, so that the branch that checks
# a valid config runs with many keys given.
_section = st.fixed_dictionaries({}, optional={k: _valid_value(f) for k, f in DistributedConfig.model_fields.items()})
plausible_mappings = st.fixed_dictionaries({}, optional={
    k: _section if k == "distributed" else _valid_value(f) for k, f in TrainConfig.model_fields.items()})


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.dictionaries(keys, yaml_values, max_size=6), plausible_mappings))
def test_any_mapping_either_validates_or_gives_a_one_line_error(raw):
    try:
        cfg = config_from_mapping(raw)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
    else:
        # It holds exactly what was given, and the defaults for the rest; what a run writes to
        # params.yaml reads back as the same config.
        assert isinstance(cfg, TrainConfig)
        # The preset fills in what raw lacks; its unfreeze follows the run's epochs and freeze_ratio.
        preset = {"recipe": "modern", **{k: raw[k] for k in ("epochs", "freeze_ratio") if k in raw}} \
            if raw.get("recipe") == "modern" else {}
        values, defaults = cfg.to_dict(), TrainConfig(**preset).to_dict()
        for key, default in defaults.items():
            given = raw.get(key, default)
            if key == "distributed" and isinstance(given, dict):
                given = {**default, **given}
            assert _same(values[key], given), (key, values[key], given)
        assert config_from_mapping(values) == cfg


def _same(a, b) -> bool:
    """Equal as YAML values: nan equals nan, a list equals a tuple with the same items."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


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
