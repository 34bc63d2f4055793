"""The MLflow model registry: register a run's best model, keep the alias `champion` on the best one.

`register_and_promote` adds a version of a registered model from a logged model URI and moves the
alias `champion` to it only when its validation accuracy is strictly higher than the current
champion's: a worse (or equal) nightly run never replaces a better model. Both accuracies are
recorded on the MLflow run (metrics) and on the new version (tags), so every decision can be read
back later. Plain functions over an `MlflowClient`: no Prefect, any tracking store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CHAMPION = "champion"
VAL_ACC_TAG = "val_acc"  # on every version this module registers
RUN_VAL_ACC_METRIC = "best_val_acc"  # the training run's metric, for versions registered elsewhere

# On the training run: this model's accuracy and the champion's it was compared with.
CANDIDATE_METRIC = "registry_candidate_val_acc"
CHAMPION_METRIC = "registry_champion_val_acc"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    val_acc: float  # the value of `metric` compared (val accuracy unless select_metric says otherwise)
    previous_version: str | None  # the champion before this registration, if any
    previous_val_acc: float | None  # the champion's value of `metric`
    promoted: bool
    metric: str = "val_acc"

    def summary(self) -> str:
        label = "val accuracy" if self.metric == "val_acc" else self.metric.replace("_", " ")
        before = (
            "no champion before"
            if self.previous_version is None
            else f"champion was version {self.previous_version} "
            f"({label} {_fmt(self.previous_val_acc)})"
        )
        verdict = f"now @{CHAMPION}" if self.promoted else f"@{CHAMPION} unchanged"
        return (f"Registered {self.name} version {self.version} ({label} {self.val_acc:.4f}); "
                f"{before}; {verdict}")


def log_summary(client, run_id: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
    """Log run-level metrics (step 0) and tags. A value the run already holds is not logged again: a
    resumed run logs its summary a second time, and a metric's history should not show it twice."""
    from mlflow.entities import Metric, RunTag

    held = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    fresh = [Metric(k, float(v), now, 0) for k, v in metrics.items() if held.get(k) != float(v)]
    run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    if fresh or run_tags:
        client.log_batch(run_id, metrics=fresh, tags=run_tags)


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"


def _model_id(model_uri: str) -> str | None:
    """`models:/m-abc` (what MLflow 3's log_model returns) -> `m-abc`; None for other URIs."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest and "/" not in rest and "@" not in rest else None


def ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def current_champion(client, name: str, alias: str = CHAMPION):
    """The model version the alias points to, or None. (Read from the registered model's aliases:
    a missing alias is an INVALID_PARAMETER_VALUE error in get_model_version_by_alias.)"""
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def version_val_acc(client, version, metric: str = VAL_ACC_TAG) -> float | None:
    """A version's value of `metric` (val_acc, val_macro_f1): its tag, else its training run's
    best_<metric>, else None."""
    tagged = (version.tags or {}).get(metric)
    if tagged is not None:
        try:
            return float(tagged)
        except ValueError:
            pass
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(f"best_{metric}")
        if value is not None:
            return float(value)
    return None


def should_promote(val_acc: float, champion_val_acc: float | None, has_champion: bool) -> bool:
    """Only a strictly better model takes the alias. A champion whose accuracy is unknown (set by
    hand on a version registered elsewhere) keeps it: someone chose it on purpose."""
    if not has_champion:
        return True
    return champion_val_acc is not None and val_acc > champion_val_acc


def registered_version(client, name: str, model_uri: str):
    """The version of `name` registered from `model_uri`, or None."""
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.source == model_uri:
            return version
    return None


def _tag_or_none(tags: dict[str, str], key: str) -> str | None:
    value = tags.get(key, "none")
    return None if value == "none" else value


def register_and_promote(
    client, name: str, model_uri: str, run_id: str, val_acc: float, alias: str = CHAMPION, metric: str = VAL_ACC_TAG
) -> Registration:
    """Register `model_uri` (logged by run `run_id`) as a new version of `name`; move `alias` to it
    when `val_acc`, its value of `metric` (select_metric: val_acc or val_macro_f1), beats the current
    holder's value of the same metric. Records both values on the run and the version; the names are
    the val_acc ones for val_acc, with the metric's name in them otherwise.

    Safe to repeat (a resumed run): a model registered before is not registered again, and a
    decision is made once. Its inputs are tagged on the version before the alias moves and
    `promoted` is tagged last, so a run killed in between finishes the same decision."""
    ensure_registered_model(client, name)
    version = registered_version(client, name, model_uri)
    if version is None:
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, model_id=_model_id(model_uri),
            tags={metric: repr(float(val_acc))},
        )
    before_key, acc_before_key = f"{alias}_version_before", f"{alias}_{metric}_before"
    if "promoted" in version.tags:  # decided before: read back, move nothing (the alias may have moved on since)
        acc = _tag_or_none(version.tags, acc_before_key)
        return Registration(name=name, version=str(version.version), val_acc=float(val_acc),
                            previous_version=_tag_or_none(version.tags, before_key),
                            previous_val_acc=None if acc is None else float(acc),
                            promoted=version.tags["promoted"] == "true", metric=metric)
    if before_key in version.tags:
        previous_version = _tag_or_none(version.tags, before_key)
        acc = _tag_or_none(version.tags, acc_before_key)
        previous_acc = None if acc is None else float(acc)
    else:
        previous = current_champion(client, name, alias)
        previous_version = None if previous is None else str(previous.version)
        previous_acc = version_val_acc(client, previous, metric) if previous is not None else None
        client.set_model_version_tag(name, version.version, acc_before_key,
                                     "none" if previous_acc is None else repr(previous_acc))
        client.set_model_version_tag(name, version.version, before_key, previous_version or "none")
    promoted = should_promote(val_acc, previous_acc, previous_version is not None)
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)

    metrics = {CANDIDATE_METRIC.replace("val_acc", metric): float(val_acc)}
    if previous_acc is not None:
        metrics[CHAMPION_METRIC.replace("val_acc", metric)] = previous_acc
    log_summary(client, run_id, metrics, tags={
        "registry.model": name,
        "registry.version": str(version.version),
        "registry.promoted": str(promoted).lower(),
        f"registry.{before_key}": previous_version or "none",
    })
    client.set_model_version_tag(name, version.version, "promoted", str(promoted).lower())
    return Registration(
        name=name,
        version=str(version.version),
        val_acc=float(val_acc),
        previous_version=previous_version,
        previous_val_acc=previous_acc,
        promoted=promoted,
        metric=metric,
    )


__all__ = [
    "CHAMPION",
    "Registration",
    "current_champion",
    "ensure_registered_model",
    "log_summary",
    "register_and_promote",
    "registered_version",
    "should_promote",
    "version_val_acc",
]
