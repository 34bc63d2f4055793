"""The Prefect flow end to end on a real (temporary) Prefect server and a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from mlflow.tracking import MlflowClient

from flows.train_flow import train_flow
from harv_train.core import checkpoints as ckpt
from harv_train.core import session as session_module
from harv_train.config import write_params_file
from tests.images import file_one_image_under_the_other_class
from tests.trained import calibrated_weights, oracle_logits

pytestmark = pytest.mark.usefixtures("prefect_server")


def _run(cfg, tmp_path, resume=False):
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    return train_flow(params_file=str(params), resume=resume, return_state=True)


def _mlflow_run(cfg, run_id):
    client = MlflowClient(cfg.mlflow_tracking_uri)
    return client, client.get_run(run_id)


def test_flow_trains_checkpoints_and_logs_an_mlflow_run(make_config, tmp_path):
    cfg = make_config(epochs=2)
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    summary = state.result()
    for name in (ckpt.BEST, ckpt.FINAL, ckpt.LAST):
        assert (cfg.checkpoints_dir / name).is_file()

    client, run = _mlflow_run(cfg, summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.params["model_name"] == "mobilenet_v3_small" and run.data.params["epochs"] == "2"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_time_s", "val_time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.data.metrics["best_val_acc"] == summary.best_val_acc
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/best_model.pth", "checkpoints/final_model.pth"} <= artifacts
    assert "params.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]


def test_logged_model_computes_what_the_best_checkpoint_computes(make_config, tmp_path, monkeypatch):
    """The logged model is the pickle-free pyfunc (it loads with pickles refused): image files in, the best
    checkpoint's calibrated softmax out, on ONNX (what it serves with by default) and on PyTorch; the
    run holds the temperature, ECE before and after, and the reliability diagram."""
    import base64

    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    # Calibrated weights: a random-init model at 32 px gives every image the same logits. Two val images
    # it gets wrong: a temperature is fitted only on a val split that has errors.
    cfg = make_config(epochs=1, pretrained=True, weights_path=str(calibrated_weights()))
    file_one_image_under_the_other_class(Path(cfg.data_dir, "val"))
    state = _run(cfg, tmp_path)
    client, run = _mlflow_run(cfg, state.result().mlflow_run_id)
    [logged] = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    best = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.BEST)
    assert logged.tags["harv_train.best_epoch"] == str(best["epoch"])
    images = sorted(Path(cfg.data_dir, "val").rglob("*.png"))
    request = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    # The flow calibrated best_model.pth: the logged model divides the logits by its temperature.
    want = (oracle_logits(cfg.checkpoints_dir / ckpt.BEST, images) / best["temperature"]).softmax(1)
    assert want.std(0).min() > 1e-3  # outputs that depend on the input, so the comparison means something
    for runtime in ("onnx", "torch"):
        (tmp_path / runtime).mkdir()
        model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}", dst_path=str(tmp_path / runtime),
                                         model_config={"runtime": runtime})
        got = [[row["probabilities"][c] for c in best["classes"]] for row in model.predict(request)]
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)
    assert run.data.metrics["temperature"] == best["temperature"] != 1.0
    assert run.data.metrics["val_ece_calibrated"] <= run.data.metrics["val_ece"]
    assert "evaluation/reliability.png" in {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}


def test_a_sqlite_store_keeps_its_artifacts_beside_it(make_config, tmp_path, monkeypatch):
    """Not in ./mlruns of the directory the run started from (MLflow's default), wherever that is."""
    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "store"
    store.mkdir()
    cfg = make_config(epochs=1, mlflow_tracking_uri=f"sqlite:///{store / 'mlflow.db'}", mlflow_experiment="beside it")
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    client, run = _mlflow_run(cfg, state.result().mlflow_run_id)
    assert client.get_experiment(run.info.experiment_id).artifact_location == (store / "mlruns" / "beside_it").as_uri()
    assert (store / "mlruns" / "beside_it" / run.info.run_id / "artifacts" / "checkpoints" / ckpt.BEST).is_file()
    assert list(elsewhere.iterdir()) == []


def test_the_demo_model_exports_and_prefect_shows_one_task_per_epoch_and_the_run_artifacts(make_config, tmp_path):
    """efficientnet_lite0 (the demo's model, pretrained) with export on, as make demo runs it; then what
    the Prefect API holds for the flow run: one train-epoch task run per epoch, the per-epoch table
    and the link to the MLflow run."""
    import onnxruntime
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    cfg = make_config(model_name="efficientnet_lite0", pretrained=True, img_size=64, epochs=2, export=True)
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    summary = state.result()
    client, run = _mlflow_run(cfg, summary.mlflow_run_id)

    # The export: ONNX computes what best_model.pth computes on the val images (divided by the
    # temperature the flow fitted), and MLflow has it.
    best = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.BEST)
    images = sorted(Path(cfg.data_dir, "val").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR),
                                                 dtype=np.float32).copy()).permute(2, 0, 1) for p in images]) / 255
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        want = ckpt.load_model_from_checkpoint(best)(x).numpy() / best["temperature"]
    session = onnxruntime.InferenceSession(str(cfg.export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want, atol=1e-4, rtol=0)
    assert want.std(0).min() > 1e-3  # outputs that depend on the image
    assert {"export/model.onnx", "export/model.ts"} <= {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert run.data.metrics["export_onnxruntime_max_abs_diff"] <= 1e-4

    # Prefect: what the API holds for this flow run.
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = {a.key: a for a in prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}
    epochs = sorted((t.name, t.state.type.value) for t in task_runs if t.task_key.startswith("train_epoch_task"))
    assert epochs == [("epoch-0", "COMPLETED"), ("epoch-1", "COMPLETED")]
    table = artifacts["training-summary"].data
    for m in summary.history:
        assert f"| {m.val_loss:.4f} | {m.val_acc:.4f} |" in table
    url = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert f"[MLflow run]({url})" in artifacts["mlflow-run"].data
    assert summary.mlflow_run_id in table


def test_a_failing_epoch_is_retried_and_resumed_not_restarted(make_config, tmp_path, monkeypatch):
    reference = _run(make_config(epochs=3, artifacts_dir=str(tmp_path / "ref")), tmp_path).result()

    real = session_module.train_one_epoch
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)  # the weights in memory have moved on...
        if len(calls) == 2:
            raise OSError("simulated I/O error in epoch 2")  # ...and the epoch fails
        return result

    monkeypatch.setattr(session_module, "train_one_epoch", flaky)
    cfg = make_config(epochs=3, epoch_retries=1, artifacts_dir=str(tmp_path / "flaky"))
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    history = state.result().history
    assert len(calls) == 4  # epochs 1, 2 (failed), 2 (retried), 3: epoch 1 was not run again
    assert [m.epoch for m in history] == [1, 2, 3]
    keys = ("train_loss", "val_loss", "val_acc")
    assert [[getattr(m, k) for k in keys] for m in history] == [[getattr(m, k) for k in keys] for m in reference.history]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert [m.step for m in client.get_metric_history(state.result().mlflow_run_id, "val_acc")] == [1, 2, 3]


def test_retries_used_up_fail_the_flow_with_the_cause_and_keep_best(make_config, tmp_path, monkeypatch):
    real = session_module.train_one_epoch
    calls = []

    def broken_after_first(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk read error on batch 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(session_module, "train_one_epoch", broken_after_first)
    cfg = make_config(epochs=3, epoch_retries=1)
    state = _run(cfg, tmp_path)
    assert state.is_failed()
    assert "disk read error on batch 3" in state.message
    best = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.BEST)
    assert best["epoch"] == 1
    _, run = _mlflow_run(cfg, best["mlflow_run_id"])
    assert run.info.status == "FAILED"  # not left "running" in the MLflow UI


def test_resume_continues_the_same_mlflow_run(make_config, tmp_path):
    cfg = make_config(epochs=1)
    first = _run(cfg, tmp_path).result()
    longer = make_config(epochs=3)
    second = _run(longer, tmp_path, resume=True).result()
    assert second.mlflow_run_id == first.mlflow_run_id
    assert [m.epoch for m in second.history] == [1, 2, 3]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert [m.step for m in client.get_metric_history(first.mlflow_run_id, "val_acc")] == [1, 2, 3]


def test_resuming_a_finished_run_logs_nothing_twice(make_config, tmp_path):
    cfg = make_config(epochs=1, registered_model_name="twice")
    first = _run(cfg, tmp_path).result()
    again = _run(cfg, tmp_path, resume=True)
    assert again.is_completed(), again.message
    client, run = _mlflow_run(cfg, first.mlflow_run_id)
    for key in run.data.metrics:  # summary metrics at step 0, epochs at their step: each once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        if key.startswith("system/"):  # sampled every 10 s while training: the resume continues their steps
            assert len(steps) == len(set(steps)), key
        else:
            assert len(steps) == 1, key
    assert len(client.search_logged_models(experiment_ids=[run.info.experiment_id])) == 1
    assert [str(v.version) for v in client.search_model_versions("name = 'twice'")] == ["1"]


def test_bad_input_fails_the_flow_with_a_one_line_message(make_config, tmp_path):
    cfg = make_config(data_dir=str(tmp_path / "missing"))
    state = _run(cfg, tmp_path)
    assert state.is_failed()
    assert "does not exist: put images in" in state.message and "\n" not in state.message


def _no_room(monkeypatch, cfg, tmp_path):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB free


def _blocked_artifacts_dir(monkeypatch, cfg, tmp_path):
    Path(cfg.artifacts_dir).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.artifacts_dir).write_text("a file where artifacts_dir goes")


def _checkpoints_is_a_file(monkeypatch, cfg, tmp_path):
    cfg.checkpoints_dir.parent.mkdir(parents=True)
    cfg.checkpoints_dir.write_text("a file where the checkpoints go")


@pytest.mark.parametrize(("breakage", "expected"), [
    (_blocked_artifacts_dir, "cannot create artifacts_dir"),
    (_checkpoints_is_a_file, "cannot write to"),
    (_no_room, "not enough free disk space"),  # for the decoded-image cache: the flow decodes first
], ids=["artifacts-dir-cannot-be-created", "checkpoints-not-writable", "no-space"])
def test_an_unusable_artifacts_dir_fails_the_flow_in_one_line_and_writes_nothing(
        make_config, tmp_path, monkeypatch, breakage, expected):
    """What a deployment gets (no command line before the flow)."""
    cfg = make_config(epochs=1)
    breakage(monkeypatch, cfg, tmp_path)
    state = _run(cfg, tmp_path)
    assert state.is_failed() and expected in state.message and "\n" not in state.message, state.message
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run opened
    if Path(cfg.artifacts_dir).is_dir():
        assert [p.name for p in Path(cfg.artifacts_dir).rglob("*") if p.is_file()] in ([".lock"], [".lock", "checkpoints"])


def test_bad_input_found_by_the_flow_itself_changes_nothing(make_config, tmp_path, monkeypatch):
    """A deployment calls the flow without the command line's checks: the flow makes them first."""
    cfg = make_config(epochs=1)
    assert _run(cfg, tmp_path).is_completed()
    before = sorted(p.name for p in cfg.checkpoints_dir.iterdir())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    state = _run(make_config(epochs=1, pretrained=True), tmp_path)
    assert state.is_failed() and "not available offline" in state.message
    assert sorted(p.name for p in cfg.checkpoints_dir.iterdir()) == before  # not moved aside
    client = MlflowClient(cfg.mlflow_tracking_uri)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1  # none opened


def test_skipped_images_are_counted_in_the_mlflow_run(make_config, image_folder, tmp_path):
    (image_folder / "train" / "cat" / "zero-bytes.jpg").write_bytes(b"")
    cfg = make_config(epochs=1, skip_bad_images=True)
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    _, run = _mlflow_run(cfg, state.result().mlflow_run_id)
    assert run.data.metrics["skipped_images"] == 1 and run.data.metrics["train_images"] == 16


def test_a_retried_epoch_that_last_pth_already_holds_ends_the_run_normally(make_config, tmp_path, monkeypatch):
    """The epoch task fails after last.pth was written; its retry finds the epoch done and must still
    return a whole result (with `stop`): a result without it ended the flow in a KeyError."""
    real_save = ckpt.save_checkpoint
    failed = []

    def save_then_fail_once(state, path):
        real_save(state, path)
        if path.name == ckpt.LAST and state["epoch"] == 1 and not failed:
            failed.append(path)
            raise OSError("simulated failure after last.pth was written")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_fail_once)
    cfg = make_config(epochs=2, epoch_retries=1)
    state = _run(cfg, tmp_path)
    assert failed and state.is_completed(), state.message
    assert [m["epoch"] for m in ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["history"]] == [1, 2]
