"""params.yaml and --set: one typed, validated config; every mistake is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from harv_train.config import VALID_KEYS, TrainConfig, config_from_mapping, load_config, parse_override
from harv_train.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_repo_params_yaml_has_the_seed_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert (cfg.model_name, cfg.epochs, cfg.batch_size, cfg.lr) == ("mobilenet_v3_small", 3, 16, 0.0005)
    assert (cfg.freeze_ratio, cfg.seed, cfg.img_size) == (0.7, 42, 224)
    assert cfg.classes == ["ProfA", "Room1"]
    assert cfg.data_dir == "data/processed" and cfg.mlflow_tracking_uri == "sqlite:///mlflow.db"


def test_every_key_in_repo_params_yaml_is_documented_there():
    text = (REPO / "params.yaml").read_text()
    missing = [k for k in VALID_KEYS if f"\n{k}:" not in "\n" + text]
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


def test_missing_keys_take_defaults():
    assert config_from_mapping({}) == TrainConfig()


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
        ("model_name", "resnet50", "model_name must be one of mobilenet_v3_small, efficientnet_b0, efficientnet_lite0"),
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
