"""The flow against a real `mlflow server` (SQLite backend, local artifact root, on a free loopback
port): metrics, the logged model, the model registry and its champion alias over the REST API, and
a server that dies mid-run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.train_flow import train_flow
from harv_train.core import checkpoints as ckpt
from harv_train.core.session import TrainingSession
from harv_train.config import write_params_file
from tests.images import write_image_folder
from tests.servers import mlflow_server, stop

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server.url


def _run(cfg, tmp_path):
    params = tmp_path / f"params-{cfg.registered_model_name}-{abs(hash(cfg.artifacts_dir))}.yaml"
    write_params_file(cfg, params)
    return train_flow(params_file=str(params), return_state=True)


def _predict(model, img_size: int) -> torch.Tensor:
    batch = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, img_size, img_size)).astype(np.float32))
    with torch.no_grad():
        return model(batch)


def test_run_logs_metrics_model_and_a_champion_that_predicts(make_config, server_url, tmp_path):
    import mlflow.pytorch

    cfg = make_config(epochs=2, mlflow_tracking_uri=server_url, registered_model_name="server-model", export=False)
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

    # What @champion serves is the best checkpoint: same outputs on the same input.
    mlflow.set_tracking_uri(server_url)
    served = mlflow.pytorch.load_model("models:/server-model@champion", dst_path=str(tmp_path))
    best = ckpt.load_model_from_checkpoint(ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.BEST))
    assert torch.allclose(_predict(served.eval(), 32), _predict(best, 32), atol=1e-5)


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


def test_server_dying_mid_run_keeps_checkpoints_and_fails_visibly(make_config, tmp_path, monkeypatch):
    # Connection refused should fail at once, not after MLflow's retries with backoff.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with mlflow_server(tmp_path / "dying-server") as server:
        real_train_epoch = TrainingSession.train_epoch

        def train_epoch_then_stop_the_server_after_the_first(session, epoch, *args, **kwargs):
            result = real_train_epoch(session, epoch, *args, **kwargs)
            if epoch == 0:
                stop(server.proc, grace=0)  # killed, as by a crash or OOM
            return result

        monkeypatch.setattr(TrainingSession, "train_epoch", train_epoch_then_stop_the_server_after_the_first)
        cfg = make_config(epochs=2, mlflow_tracking_uri=server.url, registered_model_name="dying-model",
                          export=False)
        state = _run(cfg, tmp_path)

    assert state.is_failed()
    assert str(cfg.checkpoints_dir) in state.message and server.url in state.message
    for name in (ckpt.BEST, ckpt.FINAL, ckpt.LAST):
        assert (cfg.checkpoints_dir / name).is_file()
    assert len(ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["history"]) == 2  # both epochs trained
