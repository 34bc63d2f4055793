"""The sweep's MLflow side: its trials are child runs of one parent run (tag mlflow.parentRunId,
set by the training flow from the sweep's `run_tags`); the winner is found among them and
registered under the champion rule (harv_train/tracking/registry.py). Plain MLflow, no Prefect."""

from __future__ import annotations

from harv_train.tracking import registry
from harv_train.tracking.registry import Registration

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "sweep.trial"
SWEEP_ID_TAG = "sweep.id"


def child_tags(parent_run_id: str | None, study_name: str, number: int, sweep_id: str) -> dict[str, str]:
    """The tags a trial's training run carries: its parent (MLflow nests it there; none while MLflow is
    down when the trial starts), its trial number, and the sweep's id (adopt_children finds it by it)."""
    tags = {TRIAL_TAG: str(number), "sweep.study": study_name, SWEEP_ID_TAG: sweep_id}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return tags


def adopt_children(client, experiment_id: str, parent_run_id: str, sweep_id: str) -> int:
    """Nest under the parent the sweep's trial runs that were opened without it (MLflow came back
    between the trial's start and its end); returns how many."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}'",
                              max_results=10_000)
    orphans = [r for r in runs if TRIAL_TAG in r.data.tags and PARENT_TAG not in r.data.tags]
    for run in orphans:
        client.set_tag(run.info.run_id, PARENT_TAG, parent_run_id)
    return len(orphans)


def child_runs(client, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10_000)


def trial_run(client, experiment_id: str, parent_run_id: str, number: int):
    """The child run of trial `number`, or None."""
    runs = [r for r in child_runs(client, experiment_id, parent_run_id) if r.data.tags.get(TRIAL_TAG) == str(number)]
    return runs[0] if runs else None


def test_metrics(run) -> dict[str, float]:
    """The run's test-split metrics (test_*, logged by the training flow when its data has a test split)."""
    return {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}


def logged_model_uri(client, experiment_id: str, run_id: str) -> str | None:
    """The models:/ URI of the (best) model the training run logged, or None."""
    from mlflow.entities import LoggedModelStatus

    for model in client.search_logged_models(experiment_ids=[experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'"):
        if model.status == LoggedModelStatus.READY:
            return model.model_uri
    return None


def register_winner(client, tracking_uri: str, name: str, model_uri: str, run_id: str,
                    val_acc: float) -> Registration:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # MLflow resolves models:/ sources through it
    return registry.register_and_promote(client, name, model_uri, run_id, val_acc)
