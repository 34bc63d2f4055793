"""The one typed, validated training configuration.

`load_config(path, overrides)` reads params.yaml, applies `--set KEY=VALUE` overrides and returns a
frozen `TrainConfig`. Every way a value can be wrong (unknown key, wrong type, out of range) becomes
a one-line `ConfigError` that names the key, what it must be and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from harv_train.errors import ConfigError

MODEL_NAMES = ("mobilenet_v3_small", "efficientnet_b0", "efficientnet_lite0")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float: PyYAML follows YAML 1.1, where a float needs a
    dot (`1.0e-4`), and would hand `lr: 1e-4` over as the string '1e-4'."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested sections as dotted keys: {"distributed": {"nnodes": 1}} -> {"distributed.nnodes": 1}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class DistributedConfig:
    """Data-parallel training under torchrun; nproc_per_node x nnodes = 1 is the plain single process."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = "127.0.0.1:29400"  # used when nnodes > 1; one node alone rendezvouses by itself
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    max_restarts: int = 0  # torchrun restarts of all workers after a worker fails, below Prefect's retries

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class TrainConfig:
    # The seed's keys, with its defaults.
    model_name: str = "mobilenet_v3_small"
    epochs: int = 3
    batch_size: int = 16
    lr: float = 0.0005
    freeze_ratio: float = 0.7
    seed: int = 42
    img_size: int = 224
    classes: list[str] | None = None
    # Where things live.
    data_dir: str = "data/processed"
    artifacts_dir: str = "artifacts"
    # Weights.
    pretrained: bool = True
    weights_path: str | None = None
    # Optimisation.
    weight_decay: float = 1e-4
    early_stopping_patience: int = 5
    lr_factor: float = 0.5
    lr_patience: int = 3
    min_lr: float = 1e-7
    # Orchestration and hardware.
    epoch_retries: int = 2
    device: str = "auto"
    num_workers: int = 2
    threads: int = 0
    channels_last: bool = True
    cache_max_mb: int = 2048
    skip_bad_images: bool = False
    # After training: export the best model to TorchScript and ONNX (the evaluation always runs).
    export: bool = True
    # Tracking.
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    mlflow_experiment: str = "harv-train"
    registered_model_name: str | None = None
    # Beyond one process.
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """Nested sections as dotted keys (`distributed.nproc_per_node`): MLflow params are flat."""
        return flatten(self.to_dict())

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.artifacts_dir) / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        """The evaluation report of best_model.pth (harv_train/reporting/post_training.py)."""
        return Path(self.artifacts_dir) / "eval"

    @property
    def export_dir(self) -> Path:
        """TorchScript and ONNX files of best_model.pth (harv_train/reporting/post_training.py)."""
        return Path(self.artifacts_dir) / "export"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_device(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    if v in ("auto", "cpu", "cuda"):
        return True
    return v.startswith("cuda:") and v[5:].isdigit()


def _is_class_list(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, list)
        and len(v) >= 2
        and all(isinstance(c, str) and c.strip() and "/" not in c for c in v)
        and len(set(v)) == len(v)
    )


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


# key -> (check, what the value must be). The check sees the raw YAML value.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model_name": (lambda v: v in MODEL_NAMES, "one of " + ", ".join(MODEL_NAMES)),
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "freeze_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "img_size": (lambda v: _is_int(v) and 32 <= v <= 1024, "an integer from 32 to 1024"),
    "classes": (_is_class_list, "null or a list of 2 or more distinct folder names"),
    "data_dir": (_nonempty_str, "a directory path"),
    "artifacts_dir": (_nonempty_str, "a directory path"),
    "pretrained": (lambda v: isinstance(v, bool), "true or false"),
    "weights_path": (lambda v: v is None or _nonempty_str(v), "null or a file path"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "early_stopping_patience": (
        lambda v: _is_int(v) and v >= 0,
        "an integer >= 0 (0 turns early stopping off)",
    ),
    "lr_factor": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "lr_patience": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_lr": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "epoch_retries": (lambda v: _is_int(v) and 0 <= v <= 100, "an integer from 0 to 100"),
    "device": (_is_device, "auto, cpu, cuda or cuda:N"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "threads": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 uses every available core)"),
    "channels_last": (lambda v: isinstance(v, bool), "true or false"),
    "cache_max_mb": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 never caches)"),
    "skip_bad_images": (lambda v: isinstance(v, bool), "true or false"),
    "export": (lambda v: isinstance(v, bool), "true or false"),
    "mlflow_tracking_uri": (_nonempty_str, "a tracking URI such as sqlite:///mlflow.db"),
    "mlflow_experiment": (_nonempty_str, "an experiment name"),
    "registered_model_name": (lambda v: v is None or _nonempty_str(v), "null or a model name"),
}

_DISTRIBUTED_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "nproc_per_node": (lambda v: _is_int(v) and 1 <= v <= 1024, "an integer from 1 to 1024"),
    "nnodes": (lambda v: _is_int(v) and 1 <= v <= 1024, "an integer from 1 to 1024"),
    "rdzv_endpoint": (
        lambda v: isinstance(v, str) and v.rpartition(":")[0] != "" and v.rpartition(":")[2].isdigit(),
        "HOST:PORT",
    ),
    "backend": (lambda v: v in ("auto", "gloo", "nccl"), "auto, gloo or nccl"),
    "max_restarts": (lambda v: _is_int(v) and 0 <= v <= 100, "an integer from 0 to 100"),
}
_RULES["distributed"] = (
    lambda v: isinstance(v, Mapping),
    "a mapping with keys " + ", ".join(_DISTRIBUTED_RULES),
)

VALID_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
assert set(_RULES) == set(VALID_KEYS), "every TrainConfig field needs a validation rule"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_mapping(raw: Mapping[str, Any], source: str = "params") -> TrainConfig:
    """Validate a mapping of params into a TrainConfig; `source` names it in error messages."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source} must be a mapping of `key: value` lines, got {type(raw).__name__}: "
            "see params.yaml in the repository for the format"
        )
    unknown = sorted(repr(k) for k in raw if k not in _RULES)  # repr: a key may hold a newline
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(VALID_KEYS)}"
        )
    for key, value in raw.items():
        check, expected = _RULES[key]
        if not check(value):
            raise ConfigError(f"{source}: {key} must be {expected}, got {_short(value)}")
    values = dict(raw)
    if "distributed" in values:
        values["distributed"] = _distributed_from_mapping(values["distributed"], source)
    for key in ("lr", "freeze_ratio", "weight_decay", "lr_factor", "min_lr"):
        if key in values:
            values[key] = float(values[key])
    if values.get("classes") is not None:
        values["classes"] = list(values["classes"])
    cfg = TrainConfig(**values)
    world = cfg.distributed.world_size
    if cfg.batch_size % world:
        raise ConfigError(
            f"{source}: batch_size {cfg.batch_size} must be divisible by the {world} processes of distributed "
            "(nproc_per_node x nnodes): it is the global batch, split evenly across them"
        )
    return cfg


def _distributed_from_mapping(raw: Mapping[str, Any], source: str) -> DistributedConfig:
    unknown = sorted(repr(k) for k in raw if k not in _DISTRIBUTED_RULES)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} in distributed; valid keys are: "
            + ", ".join(_DISTRIBUTED_RULES)
        )
    for key, value in raw.items():
        check, expected = _DISTRIBUTED_RULES[key]
        if not check(value):
            raise ConfigError(f"{source}: distributed.{key} must be {expected}, got {_short(value)}")
    return DistributedConfig(**raw)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file into a dict (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found: pass --params PATH to an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read params file {path} ({exc}): check its permissions and encoding") from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must be a mapping of `key: value` lines, got a YAML {type(raw).__name__}: "
            "see params.yaml in the repository for the format"
        )
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one `--set KEY=VALUE`; VALUE is YAML, so `epochs=5` is an int and `classes=[a, b]` a list."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE: write it like --set epochs=5")
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: quote it, e.g. --set {key}='...'") from None
    return key, value


def _is_section_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("distributed.") and len(key) > len("distributed.")


def load_config(
    params_path: str | Path | None = "params.yaml",
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """params.yaml (optional) + overrides -> validated TrainConfig."""
    raw: dict[str, Any] = {} if params_path is None else read_params_file(params_path)
    source = "params" if params_path is None else str(params_path)
    if overrides:
        bad = sorted(repr(k) for k in overrides if k not in _RULES and not _is_section_key(k))
        if bad:
            raise ConfigError(
                f"--set: unknown key(s) {', '.join(bad)}; valid keys are: {', '.join(VALID_KEYS)}"
                + " (and distributed.KEY)"
            )
        for key, value in overrides.items():
            if _is_section_key(key):  # distributed.nproc_per_node=2 sets one key of the section
                section, _, sub = key.partition(".")
                current = raw.get(section)
                raw[section] = {**(current if isinstance(current, Mapping) else {}), sub: value}
            else:
                raw[key] = value
        source += " with --set overrides"
    return config_from_mapping(raw, source)


def write_params_file(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved params as YAML, so a run's params.yaml can be logged and reused with --params."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


__all__ = [
    "MODEL_NAMES",
    "DistributedConfig",
    "TrainConfig",
    "VALID_KEYS",
    "config_from_mapping",
    "load_config",
    "parse_override",
    "read_params_file",
    "write_params_file",
]
