"""A test split: evaluated after training with the val report's files, logged as test_*, choosing nothing."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from flows.train_flow import train_flow
from harv_train.config import write_params_file
from tests.images import write_image_folder
from tests.trained import calibrated_weights

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_test_folder_is_evaluated_logged_as_test_and_leaves_the_champion_to_val(make_config, image_folder, tmp_path):
    # The test images are the val colours swapped: the test numbers differ from val's, so a champion
    # decided on them would show.
    write_image_folder(tmp_path / "swapped", classes=("dog", "cat"), n_train=1, n_val=4, seed=1)
    (tmp_path / "swapped" / "val").rename(image_folder / "test")
    cfg = make_config(epochs=1, registered_model_name="test-split", pretrained=True,
                      weights_path=str(calibrated_weights()))
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    state = train_flow(params_file=str(params), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    client = MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    metrics = run.data.metrics
    for key in ("test_accuracy", "test_loss", "test_macro_f1", "test_weighted_f1"):
        assert key in metrics, key
    assert metrics["test_images"] == 8
    report = json.loads((cfg.test_eval_dir / "report.json").read_text())
    assert report["split"] == "test" and report["accuracy"] == metrics["test_accuracy"]
    assert json.loads((cfg.eval_dir / "report.json").read_text())["split"] == "val"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "test")}
    assert {"test/report.json", "test/per_class.csv", "test/confusion_matrix.png", "test/worst_images.png"} <= logged
    assert metrics["test_accuracy"] != metrics["best_val_acc"]
    # The champion was compared on val accuracy, not on the test's.
    assert metrics["registry_candidate_val_acc"] == summary.best_val_acc
    version = client.get_model_version("test-split", run.data.tags["registry.version"])
    assert float(version.tags["val_acc"]) == summary.best_val_acc
