"""The flow against a real `mlflow server` (SQLite backend, local artifact root, on a free loopback
port): metrics, the logged model, the model registry and its champion alias over the REST API, and
a server that dies mid-run."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.train_flow import train_flow
from harv_train.core import checkpoints as ckpt
from harv_train.core.session import TrainingSession
from harv_train.config import write_params_file
from tests.images import write_image_folder
from tests.servers import free_port, mlflow_server, stop
from tests.trained import calibrated_weights, oracle_logits

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.url


def _run(cfg, tmp_path):
    params = tmp_path / f"params-{cfg.registered_model_name}-{abs(hash(cfg.artifacts_dir))}.yaml"
    write_params_file(cfg, params)
    return train_flow(params_file=str(params), return_state=True)


def test_run_logs_metrics_model_and_a_champion_that_predicts(make_config, server_url, tmp_path, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    # Calibrated weights: a random-init model at 32 px gives every image the same logits.
    cfg = make_config(epochs=2, mlflow_tracking_uri=server_url, registered_model_name="server-model", export=False,
                      pretrained=True, weights_path=str(calibrated_weights()))
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    summary = state.result()

    client = MlflowClient(server_url)
    run = client.get_run(summary.mlflow_run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    assert run.data.metrics["best_val_acc"] == summary.best_val_acc
    [logged] = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id

    champion = client.get_model_version_by_alias("server-model", "champion")
    assert (champion.version, champion.run_id) == ("1", run.info.run_id)
    assert float(champion.tags["val_acc"]) == summary.best_val_acc
    assert run.data.tags["registry.version"] == "1" and run.data.tags["registry.promoted"] == "true"

    # What @champion serves is the best checkpoint: the same probabilities for the same image files,
    # from a model that loads with pickles refused.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(server_url)
    served = mlflow.pyfunc.load_model("models:/server-model@champion", dst_path=str(tmp_path))
    images = sorted(Path(cfg.data_dir, "val").rglob("*.png"))
    rows = served.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    temperature = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.BEST)["temperature"]  # the flow calibrated it
    want = (oracle_logits(cfg.checkpoints_dir / ckpt.BEST, images) / temperature).softmax(1)
    assert want.std(0).min() > 1e-3  # outputs that depend on the image, so the comparison means something
    for row, probs in zip(rows, want.tolist(), strict=True):
        assert [row["probabilities"]["cat"], row["probabilities"]["dog"]] == pytest.approx(probs, abs=1e-4)


def _swap_val_labels(root):
    """The val folders of the two classes trade names: a model that learned the train set scores 0."""
    val = root / "val"
    (val / "cat").rename(val / "tmp")
    (val / "dog").rename(val / "cat")
    (val / "tmp").rename(val / "dog")
    return root


def test_champion_alias_moves_only_when_val_accuracy_improves(make_config, server_url, tmp_path):
    good = write_image_folder(tmp_path / "good")
    bad = _swap_val_labels(write_image_folder(tmp_path / "bad"))
    # Pretrained EfficientNet-Lite0 (bundled weights) separates the colour-coded classes in one
    # epoch: val accuracy 1.0 on `good`, 0.0 on `bad`.
    fast = dict(model_name="efficientnet_lite0", pretrained=True, img_size=64, lr=0.005, epochs=1,
                mlflow_tracking_uri=server_url, registered_model_name="alias-model", export=False)
    client = MlflowClient(server_url)
    accs, champions = [], []
    for i, data in enumerate((bad, good, bad)):
        cfg = make_config(data_dir=str(data), artifacts_dir=str(tmp_path / f"artifacts{i}"), **fast)
        state = _run(cfg, tmp_path)
        assert state.is_completed(), state.message
        accs.append(state.result().best_val_acc)
        champions.append(str(client.get_model_version_by_alias("alias-model", "champion").version))

    assert accs[0] < accs[1] and accs[2] < accs[1], accs
    assert champions == ["1", "2", "2"]  # first one; better, moved; worse, stayed
    third = client.get_model_version("alias-model", "3")
    assert third.tags["promoted"] == "false"
    assert (float(third.tags["val_acc"]), float(third.tags["champion_val_acc_before"])) == (accs[2], accs[1])
    run = client.get_run(third.run_id)
    assert run.data.metrics["registry_candidate_val_acc"] == accs[2]
    assert run.data.metrics["registry_champion_val_acc"] == accs[1]


@pytest.mark.slow  # 40 s; tests/test_faults.py covers a tracking store gone mid-run and back in-process
def test_a_server_stopped_mid_run_and_restarted_gets_the_whole_run_with_the_default_retries(
        make_config, tmp_path, monkeypatch):
    """Killed after epoch 1 (as by a crash or an OOM), back on the same port and store after epoch 2:
    training goes on meanwhile, and at the end everything is logged once and the model registered."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # the tracker's defaults, not a value an earlier test left
    root, port = tmp_path / "restarted-server", free_port()
    with contextlib.ExitStack() as servers:
        server = servers.enter_context(mlflow_server(root, port))
        real_train_epoch = TrainingSession.train_epoch

        def train_epoch_then_stop_or_restart_the_server(session, epoch, *args, **kwargs):
            result = real_train_epoch(session, epoch, *args, **kwargs)
            if epoch == 0:
                stop(server.proc, grace=0)
            elif epoch == 1:
                servers.enter_context(mlflow_server(root, port))
            return result

        monkeypatch.setattr(TrainingSession, "train_epoch", train_epoch_then_stop_or_restart_the_server)
        cfg = make_config(epochs=3, mlflow_tracking_uri=server.url, registered_model_name="restarted-model",
                          mlflow_experiment="restarted")
        state = _run(cfg, tmp_path)
        assert state.is_completed(), state.message
        summary = state.result()
        client = MlflowClient(server.url)
        run = client.get_run(summary.mlflow_run_id)
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_acc", "lr"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
        assert {"train_images", "best_val_acc", "eval_accuracy"} <= set(run.data.metrics)
        assert run.data.tags["registry.version"] == "1"
        [experiment] = [e for e in client.search_experiments() if e.name == "restarted"]
        assert len(client.search_runs([experiment.experiment_id])) == 1


def _cli(params: Path, *args: str, failpoint: str) -> subprocess.CompletedProcess:
    """The real command in its own process, against the tests' Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "HARV_TRAIN_FAILPOINT": failpoint,
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}  # no requests but the run's own in the count
    return subprocess.run([sys.executable, "flows/train_flow.py", "--params", str(params), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_kill_9_inside_an_mlflow_request_then_resume_logs_every_epoch_once(make_config, server_url, tmp_path):
    """Killed after the server stored epoch 1's metrics, before the client read its answer: the
    resumed run must not log epoch 1 again, and must log the rest."""
    cfg = make_config(epochs=3, mlflow_tracking_uri=server_url, mlflow_experiment="killed-inside-a-request")
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    # Requests, counted with the dataset input logged at the start: the 12th stores epoch 1's metrics
    # (after the experiment, the run, its params, dataset size and dataset input, epoch 1's history).
    killed = _cli(params, failpoint="mlflow_request:12")
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.LAST)
    client = MlflowClient(server_url)
    assert last["epoch"] == 1
    assert [m.step for m in client.get_metric_history(last["mlflow_run_id"], "val_acc")] == [1]  # stored

    resumed = _cli(params, "--resume", failpoint="")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [m.step for m in client.get_metric_history(last["mlflow_run_id"], key)] == [1, 2, 3], key
    assert client.get_run(last["mlflow_run_id"]).info.status == "FINISHED"
