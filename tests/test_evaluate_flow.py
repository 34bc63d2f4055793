"""The report in every training run's MLflow run, and `python flows/evaluate_flow.py` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.evaluate_flow import main
from flows.train_flow import train_flow
from harv_train.config import write_params_file


@pytest.mark.usefixtures("prefect_server")
def test_a_training_run_logs_the_report_plots_contact_sheet_and_export(make_config, tmp_path):
    cfg = make_config(epochs=1, export=True)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    state = train_flow(params_file=str(params), return_state=True)
    assert state.is_completed(), state.message
    run_id = state.result().mlflow_run_id
    client = MlflowClient(cfg.mlflow_tracking_uri)
    evaluation = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {f"evaluation/{name}" for name in ("report.json", "per_class.csv", "confusion_matrix.csv",
            "learning_curves.png", "confusion_matrix.png", "worst_images.png")} <= evaluation
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/model.ts", "export/model.onnx", "export/model.json", "export/export_report.json"} <= exported
    metrics = client.get_run(run_id).data.metrics
    report = json.loads((tmp_path / "artifacts" / "eval" / "report.json").read_text())
    assert metrics["eval_accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["eval_macro_f1"] == pytest.approx(report["macro_avg"]["f1"])
    assert metrics["export_onnxruntime_max_abs_diff"] <= 1e-3 and "latency_ms_onnxruntime" in metrics


@pytest.mark.usefixtures("prefect_server")
def test_evaluate_command_writes_the_report_and_the_export(make_config, tmp_path, capsys):
    from tests.trained import train_tiny

    cfg, best = train_tiny(tmp_path / "run")  # its own: the command writes beside the checkpoints
    code = main(["--checkpoint", str(best), "--data", f"{cfg.data_dir}/val", "--export", "--latency-runs", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    artifacts = tmp_path / "run" / "artifacts"  # the defaults: beside the checkpoints folder
    assert f"report in {artifacts / 'eval'}" in out and out.startswith("accuracy ")
    assert {p.name for p in (artifacts / "eval").iterdir()} >= {"report.json", "confusion_matrix.png"}
    assert {p.name for p in (artifacts / "export").iterdir()} >= {"model.ts", "model.onnx", "model.json"}


@pytest.mark.parametrize("case, expected", [
    ("not-ours", "is not a harv-train checkpoint"),
    ("missing", "does not exist: train first"),
    ("other-classes", "only in the folder: bird, fish; only in the checkpoint: cat, dog"),
])
def test_evaluate_command_bad_input_is_one_line(make_config, image_folder, tmp_path, capsys, case, expected):
    from tests.trained import start_run

    cfg = make_config()
    start_run(cfg)
    checkpoint = cfg.checkpoints_dir / "last.pth"
    data = image_folder / "val"
    if case == "not-ours":
        checkpoint = tmp_path / "weights.pth"
        torch.save({"conv.weight": torch.zeros(1)}, checkpoint)
    elif case == "missing":
        checkpoint = tmp_path / "nowhere.pth"
    else:
        (data / "cat").rename(data / "bird")
        (data / "dog").rename(data / "fish")
    code = main(["--checkpoint", str(checkpoint), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err
