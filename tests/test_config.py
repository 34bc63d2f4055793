"""params.yaml and --set: one typed, validated config; every mistake is a one-line error."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from harv_train.config import (
    MODERN_KEYS,
    VALID_KEYS,
    DistributedConfig,
    DistributedOverrides,
    ParamOverrides,
    TrainConfig,
    config_from_mapping,
    load_config,
    overrides_mapping,
    parse_override,
    write_params_file,
)
from harv_train.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_repo_params_yaml_has_the_seed_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert (cfg.model_name, cfg.epochs, cfg.batch_size, cfg.lr) == ("mobilenet_v3_small", 3, 16, 0.0005)
    assert (cfg.freeze_ratio, cfg.seed, cfg.img_size) == (0.7, 42, 224)
    assert cfg.classes == ["ProfA", "Room1"]
    assert cfg.data_dir == "data/processed" and cfg.mlflow_tracking_uri == "sqlite:///mlflow.db"


def test_every_key_in_repo_params_yaml_is_documented_there():
    text = "\n" + (REPO / "params.yaml").read_text()
    # The keys of recipe: modern are there commented out: set, they would win over the preset.
    missing = [k for k in VALID_KEYS if f"\n{k}:" not in text and not (k in MODERN_KEYS and f"\n# {k}:" in text)]
    assert missing == []


def test_set_values_are_parsed_as_yaml():
    assert parse_override("epochs=5") == ("epochs", 5)
    assert parse_override("classes=[a, b]") == ("classes", ["a", "b"])
    assert parse_override("weights_path=null") == ("weights_path", None)
    assert parse_override("lr=1e-3") == ("lr", 0.001)


def test_overrides_win_over_the_file(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("epochs: 3\nlr: 0.1\n")
    cfg = load_config(params, {"epochs": 7})
    assert (cfg.epochs, cfg.lr) == (7, 0.1)


def documented_defaults() -> dict[str, str]:
    """key -> the default column's first `value` in docs/params.md's table."""
    text = (REPO / "docs" / "params.md").read_text()
    return dict(re.findall(r"^\| `([\w.]+)` \| `([^`]*)`", text, flags=re.M))


def test_documented_defaults_are_the_defaults():
    documented = documented_defaults()
    actual = TrainConfig().flat_dict()
    assert sorted(documented) == sorted(actual)  # every key documented, and no key that isn't one
    for key, text in documented.items():
        value = parse_override(f"{key}={text}")[1]  # read as `--set KEY=VALUE` would read it
        assert (value, type(value)) == (actual[key], type(actual[key])), key
    assert config_from_mapping({}) == TrainConfig()


def test_every_field_has_a_description():
    for model in (TrainConfig, DistributedConfig, ParamOverrides, DistributedOverrides):
        for key, info in model.model_fields.items():
            assert info.description and info.description.endswith("."), f"{model.__name__}.{key}"
    assert ParamOverrides.model_fields["lr"].description == TrainConfig.model_fields["lr"].description


def test_param_overrides_schema_shows_types_bounds_and_descriptions():
    schema = ParamOverrides.model_json_schema()
    props = schema["properties"]
    assert list(props) == list(VALID_KEYS)
    epochs = props["epochs"]
    assert {"type": "integer", "minimum": 1} in epochs["anyOf"] and {"type": "null"} in epochs["anyOf"]
    assert (epochs["default"], epochs["title"]) == (None, "Epochs") and epochs["description"]
    [name] = [s for s in props["model_name"]["anyOf"] if s.get("type") == "string"]
    assert name["enum"][:3] == ["mobilenet_v3_small", "efficientnet_b0", "efficientnet_lite0"]
    assert {"resnet18", "convnext_tiny"} <= set(name["enum"])
    [lr] = [s for s in props["lr"]["anyOf"] if s.get("type") == "number"]
    assert lr["exclusiveMinimum"] == 0
    [ref] = [s["$ref"] for s in props["distributed"]["anyOf"] if "$ref" in s]
    nested = schema["$defs"][ref.rpartition("/")[2]]
    assert nested["type"] == "object" and list(nested["properties"]) == list(DistributedConfig.model_fields)
    assert {"type": "integer", "minimum": 1, "maximum": 1024} in nested["properties"]["nnodes"]["anyOf"]
    assert schema["additionalProperties"] is False


def test_param_overrides_override_only_what_is_set(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("epochs: 3\nlr: 0.1\nclasses: [a, b]\ndistributed: {nproc_per_node: 2, max_restarts: 1}\n")
    cfg = load_config(params, ParamOverrides(epochs=7))
    assert (cfg.epochs, cfg.lr, cfg.classes, cfg.distributed.nproc_per_node) == (7, 0.1, ["a", "b"], 2)
    assert cfg == load_config(params, {"epochs": 7})
    cfg = load_config(params, ParamOverrides(distributed=DistributedOverrides(nnodes=2)))
    assert (cfg.distributed.nproc_per_node, cfg.distributed.nnodes, cfg.distributed.max_restarts) == (2, 2, 1)
    assert overrides_mapping(ParamOverrides(epochs=7, distributed={"nnodes": 2})) == {
        "epochs": 7, "distributed": {"nnodes": 2}
    }
    assert overrides_mapping(ParamOverrides(distributed={})) == {} == overrides_mapping(None)


def test_an_explicit_null_in_a_mapping_still_overrides(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("classes: [a, b]\n")
    assert load_config(params, dict([parse_override("classes=null")])).classes is None
    assert load_config(None, {"classes": None}).classes is None
    assert load_config(params, ParamOverrides(classes=None)).classes == ["a", "b"]  # None: not set


def test_bools_and_non_finite_numbers_are_refused():
    ints = [k for k, f in TrainConfig.model_fields.items() if f.annotation is int]
    floats = [k for k, f in TrainConfig.model_fields.items() if f.annotation is float]
    assert "epochs" in ints and "lr" in floats
    for key in ints:
        with pytest.raises(ConfigError, match=rf"{key} must be an integer.*, got True$"):
            config_from_mapping({key: True})
        with pytest.raises(ValidationError):
            ParamOverrides(**{key: True})
    for key in floats:
        for bad in (math.nan, math.inf, -math.inf, True):
            with pytest.raises(ConfigError, match=rf"{key} must be a number"):
                config_from_mapping({key: bad})
            with pytest.raises(ValidationError):
                ParamOverrides(**{key: bad})
    with pytest.raises(ConfigError, match=r"distributed\.nnodes must be an integer from 1 to 1024, got True"):
        load_config(None, {"distributed.nnodes": True})
    assert config_from_mapping({"lr": 1}).lr == 1.0 and isinstance(config_from_mapping({"lr": 1}).lr, float)


def test_resolved_params_file_reads_back_the_same(tmp_path):
    cfg = config_from_mapping({"classes": ["a", "b"], "lr": 1e-4, "distributed": {"nproc_per_node": 2}})
    write_params_file(cfg, tmp_path / "params.yaml")
    assert load_config(tmp_path / "params.yaml") == cfg
    assert cfg.model_copy(update={"device": "cpu"}).device == "cpu" and cfg.device == "auto"


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epoch';.*valid keys are: model_name, epochs"):
        config_from_mapping({"epoch": 3})


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", 0, "lr must be a number > 0"),
        ("lr", -1e-3, "lr must be a number > 0"),
        ("freeze_ratio", 1.5, "freeze_ratio must be a number from 0 to 1"),
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("epochs", "three", "epochs must be an integer >= 1, got 'three'"),
        ("epochs", 2.5, "epochs must be an integer >= 1"),
        ("batch_size", True, "batch_size must be an integer >= 1"),
        ("img_size", 8, "img_size must be an integer from 32 to 1024"),
        ("model_name", "resnet5", "model_name must be a torchvision classification model of the families in docs/params.md"),
        ("classes", ["only-one"], "classes must be null or a list of 2 or more"),
        ("classes", ["a", "a"], "classes must be null or a list of 2 or more distinct"),
        ("device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
        ("pretrained", "yes please", "pretrained must be true or false"),
        ("lr", float("nan"), "lr must be a number > 0"),
    ],
)
def test_out_of_range_or_wrong_type_names_key_and_range(key, value, expected):
    with pytest.raises(ConfigError) as err:
        config_from_mapping({key: value})
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_params_that_are_not_yaml(tmp_path):
    params = tmp_path / "bad.yaml"
    params.write_text("epochs: [3\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_config(params)


def test_params_that_are_not_a_mapping(tmp_path):
    params = tmp_path / "list.yaml"
    params.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="must be a mapping of `key: value` lines, got a YAML list"):
        load_config(params)


def test_missing_params_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found: pass --params PATH"):
        load_config(tmp_path / "nope.yaml")


def test_set_without_equals_sign():
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_override("epochs")


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"--set: unknown key\(s\) 'epohcs'"):
        load_config(None, {"epohcs": 3})


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"distributed.nnodes": 0}, "distributed.nnodes must be an integer from 1 to 1024, got 0"),
        ({"distributed.backend": "mpi"}, "distributed.backend must be auto, gloo or nccl, got 'mpi'"),
        ({"distributed": {"bogus": 1}}, "unknown key(s) 'bogus' in distributed; valid keys are: nproc_per_node,"),
        ({"distributed": 3}, "distributed must be a mapping with keys nproc_per_node, nnodes,"),
        ({"batch_size": 3, "distributed.nproc_per_node": 2}, "batch_size 3 must be divisible by the 2 processes"),
        ({"epochs": 0, "seed": -1}, "epochs must be an integer >= 1, got 0"),  # the first as written
        ({"seed": -1, "epochs": 0}, "seed must be an integer >= 0, got -1"),
        ({"epochs": 0, "distributed": {"bogus": 1}}, "epochs must be an integer >= 1"),  # the section comes last
    ],
)
def test_one_error_names_the_first_problem(raw, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, raw)
    assert str(err.value).startswith("params with --set overrides: ") and expected in str(err.value)
