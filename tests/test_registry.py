"""harv_train.tracking.registry on a local SQLite tracking store, without Prefect: who gets the champion alias,
what is recorded, and a registry failure that is recorded instead of raised."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from harv_train.tracking import registry
from harv_train.tracking.mlflow_tracker import MlflowTracker
from tests.servers import free_port


@pytest.fixture
def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    # Its own artifact root: without one, MLflow puts a SQLite store's files in ./mlruns of the checkout.
    return client, client.create_experiment("registry-tests", artifact_location=(tmp_path / "mlruns").as_uri())


def _logged_model(store, best_val_acc: float | None = None) -> tuple[str, str]:
    """A real (tiny) model logged by a new run; returns (run_id, models:/ URI)."""
    import mlflow
    import mlflow.pytorch

    client, experiment_id = store
    run_id = client.create_run(experiment_id).info.run_id
    if best_val_acc is not None:
        client.log_metric(run_id, "best_val_acc", best_val_acc)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(torch.nn.Linear(3, 2), name="model", pip_requirements=["torch"],
                                        serialization_format="pickle")
    return run_id, info.model_uri


@pytest.mark.parametrize(
    ("val_acc", "champion_acc", "has_champion", "promoted"),
    [
        (0.5, None, False, True),  # the first version becomes champion
        (0.8, 0.7, True, True),  # strictly better: moves
        (0.7, 0.7, True, False),  # a tie keeps the champion
        (0.6, 0.7, True, False),  # worse: stays
        (0.9, None, True, False),  # champion of unknown accuracy (set by hand): left alone
    ],
)
def test_only_a_strictly_better_model_takes_the_alias(val_acc, champion_acc, has_champion, promoted):
    assert registry.should_promote(val_acc, champion_acc, has_champion) is promoted


def test_an_equal_accuracy_registers_a_version_but_keeps_the_champion(store):
    client, _ = store
    first_run_id, first_uri = _logged_model(store)
    first = registry.register_and_promote(client, "m", first_uri, first_run_id, val_acc=0.75)
    run_id, uri = _logged_model(store)
    second = registry.register_and_promote(client, "m", uri, run_id, val_acc=0.75)

    assert (first.version, first.promoted, second.version, second.promoted) == ("1", True, "2", False)
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    tags = client.get_model_version("m", "2").tags
    assert (tags["val_acc"], tags["champion_val_acc_before"], tags["champion_version_before"]) == ("0.75", "0.75", "1")
    run = client.get_run(run_id)
    assert run.data.metrics == {"registry_candidate_val_acc": 0.75, "registry_champion_val_acc": 0.75}
    assert (run.data.tags["registry.version"], run.data.tags["registry.promoted"]) == ("2", "false")


def test_registering_a_model_again_adds_no_version_and_moves_nothing(store):
    client, _ = store
    first_run_id, first_uri = _logged_model(store)
    registry.register_and_promote(client, "m", first_uri, first_run_id, val_acc=0.6)
    run_id, uri = _logged_model(store)
    registry.register_and_promote(client, "m", uri, run_id, val_acc=0.9)

    again = registry.register_and_promote(client, "m", first_uri, first_run_id, val_acc=0.6)  # a resumed run
    assert (again.version, again.promoted, again.previous_version) == ("1", True, None)
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'm'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"


def test_a_registration_killed_before_its_decision_is_finished_on_repeat(store):
    client, _ = store
    run_id, uri = _logged_model(store)
    client.create_registered_model("m")
    client.create_model_version("m", source=uri, run_id=run_id, tags={"val_acc": "0.8"})  # then killed

    finished = registry.register_and_promote(client, "m", uri, run_id, val_acc=0.8)
    assert (finished.version, finished.promoted) == ("1", True)
    assert [str(v.version) for v in client.search_model_versions("name = 'm'")] == ["1"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert client.get_model_version("m", "1").tags["promoted"] == "true"


def test_a_champion_registered_by_hand_is_compared_by_its_runs_best_val_acc(store):
    client, _ = store
    run_id, uri = _logged_model(store, best_val_acc=0.6)
    client.create_registered_model("m")
    manual = client.create_model_version("m", source=uri, run_id=run_id)  # no val_acc tag
    client.set_registered_model_alias("m", "champion", manual.version)

    new_run_id, new_uri = _logged_model(store)
    better = registry.register_and_promote(client, "m", new_uri, new_run_id, val_acc=0.9)
    assert (better.previous_version, better.previous_val_acc, better.promoted) == ("1", 0.6, True)
    assert str(client.get_model_version_by_alias("m", "champion").version) == better.version


def test_a_registry_failure_is_recorded_not_raised(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = MlflowTracker(dead, "registry-tests")
    tracker.run_id = "0123456789abcdef"

    assert tracker.register_model("m", "models:/m-0123", 0.9) is None
    assert tracker.down
    [failure] = tracker.failures
    assert failure.startswith("registering the model as m: ")


def test_select_metric_val_macro_f1_compares_the_champion_on_macro_f1(store):
    # The newcomer has the better macro F1 but the worse accuracy: it wins on macro F1 only.
    client, _ = store
    first_run_id, first_uri = _logged_model(store)
    registry.register_and_promote(client, "m", first_uri, first_run_id, val_acc=0.5, metric="val_macro_f1")
    client.set_model_version_tag("m", "1", "val_acc", "0.9")
    run_id, uri = _logged_model(store)
    second = registry.register_and_promote(client, "m", uri, run_id, val_acc=0.7, metric="val_macro_f1")

    assert (second.promoted, second.previous_val_acc) == (True, 0.5)
    assert "val macro f1 0.7000" in second.summary()
    assert client.get_run(run_id).data.metrics == {"registry_candidate_val_macro_f1": 0.7,
                                                  "registry_champion_val_macro_f1": 0.5}
