"""The search space of a sweep: which params vary, over which range. Pure Python: no Optuna import.

A space is a YAML mapping of param name -> range, each one of
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float (log-uniform with log: true)
    lr_patience: {low: 1, high: 4}               # an integer (both bounds integers; optional step)
    batch_size: {choices: [8, 16, 32]}           # one of a list
Every key must be a param of harv_train/config.py and every bound or choice a valid value of it
(checked by validating the base config with it), so a bad space fails in one line before any trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from harv_train.config import VALID_KEYS, TrainConfig, _yaml_load, config_from_mapping
from harv_train.errors import ConfigError

# The built-in space (docs/sweeps.md): the optimiser, how much of the backbone trains, the batch,
# and the learning-rate recipe of config.py (ReduceLROnPlateau's factor and patience).
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "freeze_ratio": {"low": 0.0, "high": 1.0},
    "weight_decay": {"low": 1.0e-6, "high": 1.0e-2, "log": True},
    "batch_size": {"choices": [8, 16, 32]},
    "lr_factor": {"low": 0.1, "high": 0.9},
    "lr_patience": {"low": 0, "high": 3},
}

# Params a sweep owns or that say where things go, not how well a model trains.
NOT_SWEPT = ("artifacts_dir", "data_dir", "mlflow_tracking_uri", "mlflow_experiment", "registered_model_name",
             "classes", "distributed", "cache_dir", "weights_path", "device")


@dataclass(frozen=True)
class ParamRange:
    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "categorical"
        return "int" if isinstance(self.low, int) and isinstance(self.high, int) else "float"

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws (or, resumed, already drew) for this param."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        spec = {"low": self.low, "high": self.high}
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        return spec


@dataclass(frozen=True)
class SearchSpace:
    ranges: tuple[ParamRange, ...]

    def suggest(self, trial) -> dict[str, Any]:
        return {r.name: r.suggest(trial) for r in self.ranges}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {r.name: r.to_dict() for r in self.ranges}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_range(name: str, spec: Any, source: str) -> ParamRange:
    where = f"{source}: {name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{low: 1.0e-4, high: 1.0e-2, log: true}} or "
                          f"{{choices: [8, 16]}}, got {spec!r}")
    extra = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, extra))}; a range has low, high, log, "
                          "step, or choices")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ConfigError(f"{where}: choices cannot be combined with low/high/log/step: give one or the other")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
        return ParamRange(name, choices=tuple(choices))
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)):
        raise ConfigError(f"{where}: low and high must both be numbers, got low={low!r}, high={high!r}")
    if not low < high:
        raise ConfigError(f"{where}: low must be below high, got low={low!r}, high={high!r}: swap or widen them")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got low={low!r}: raise low or drop log")
    if step is not None and (not _is_number(step) or step <= 0):
        raise ConfigError(f"{where}: step must be a positive number, got {step!r}")
    if step is not None and log:
        raise ConfigError(f"{where}: step and log cannot be combined: drop one")
    return ParamRange(name, low=low, high=high, log=log, step=step)


def parse_space(raw: Any, base: TrainConfig, source: str = "space") -> SearchSpace:
    """A space mapping -> SearchSpace, each key a sweepable param of `base`, each bound a valid value."""
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{source} must be a non-empty mapping of param: range, see docs/sweeps.md for the format")
    ranges = []
    for name, spec in raw.items():
        if name not in VALID_KEYS:
            raise ConfigError(f"{source}: {name!r} is not a param; sweepable params are: "
                              + ", ".join(k for k in VALID_KEYS if k not in NOT_SWEPT))
        if name in NOT_SWEPT:
            raise ConfigError(f"{source}: {name} cannot be swept (it says where things go, not how a model "
                              "trains): fix it with --set instead")
        ranges.append(_parse_range(name, spec, source))
    space = SearchSpace(tuple(ranges))
    for r in space.ranges:  # every end of every range is a value the param takes
        values = r.choices if r.choices is not None else (r.low, r.high)
        for value in values:
            if r.kind == "float" and isinstance(value, int):
                value = float(value)
            try:
                config_from_mapping({**base.to_dict(), r.name: value}, f"{source}: {r.name}")
            except ConfigError as exc:
                raise ConfigError(f"{exc}: narrow the range") from None
    return space


def load_space(path: str | Path | None, base: TrainConfig) -> SearchSpace:
    """The space in the YAML file at `path`, or the built-in DEFAULT_SPACE when None."""
    if path is None:
        return parse_space(DEFAULT_SPACE, base, "the default space")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file {path} not found: pass --space PATH to an existing YAML file")
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"space file {path} is not valid YAML{where}: fix the syntax") from None
    return parse_space(raw, base, f"space file {path}")


def trial_config(base: TrainConfig, values: Mapping[str, Any], artifacts_dir: str | Path) -> TrainConfig:
    """The config one trial trains with: the base, the trial's values, its own artifacts_dir, and no
    registration (the sweep registers its winner)."""
    values = {k: float(v) if isinstance(v, int) and isinstance(getattr(base, k), float) else v
              for k, v in values.items()}
    return config_from_mapping({**base.to_dict(), **values, "artifacts_dir": str(artifacts_dir),
                                "registered_model_name": None}, "trial params")
