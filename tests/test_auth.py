"""Servers that ask for credentials, started on loopback the way `make mlflow-server`, `make server` and
docker-compose.yml start them (docker/secrets-env.sh, docker/mlflow-server.sh), with their secrets in
files: MLflow's basic-auth app, and Prefect's API auth string. A training run with the right
credentials logs and registers; with wrong ones it trains, keeps its checkpoints and fails with the
variables to set, and `--resume` with the right ones logs everything."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.train_flow import train_flow
from harv_train.config import write_params_file
from harv_train.core import checkpoints as ckpt
from tests.servers import BIN, free_port, prefect_env, running_server

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
ADMIN = "admin"


def _status(url: str, auth: str | None = None, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any credentials it may carry, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "MLFLOW_FLASK_", "PREFECT_API_AUTH",
                                "PREFECT_SERVER_API_AUTH"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # mlflow and uvicorn, started by name
    return {**env, **extra}


# ---- MLflow --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_auth(tmp_path_factory):
    """(URL, admin password) of `docker/mlflow-server.sh`, the admin password and key in files."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(24)
    port = free_port()
    env = _clean_env(
        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(_secret(root / "mlflow_admin_password", password)),
        MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=str(_secret(root / "mlflow_flask_secret_key", secrets.token_hex(16))),
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{root / 'basic_auth.db'}",
        TMPDIR=str(root),
    )
    cmd = [str(DOCKER / "secrets-env.sh"), str(DOCKER / "mlflow-server.sh"),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with running_server(f"mlflow server with auth on port {port}", cmd, f"{url}/health", root / "server.log", env=env):
        yield url, password


def test_mlflow_refuses_a_call_without_the_right_credentials(mlflow_auth):
    url, password = mlflow_auth
    api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api) == 401
    assert _status(api, f"{ADMIN}:wrong-{password}") == 401
    assert _status(f"{url}/api/2.0/mlflow/registered-models/search") == 401
    assert _status(f"{url}/") == 401  # the UI too
    assert _status(api, f"{ADMIN}:{password}") == 200
    assert _status(f"{url}/health") == 200  # for load balancers and the tests' start-up poll


def test_the_mlflow_server_will_not_start_without_an_admin_password(tmp_path):
    done = subprocess.run([str(DOCKER / "mlflow-server.sh"), "--port", str(free_port())], capture_output=True,
                          text=True, timeout=60, env=_clean_env(MLFLOW_FLASK_SERVER_SECRET_KEY="k",
                                                                MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp_path}/a.db"))
    assert done.returncode == 2
    assert "needs MLFLOW_AUTH_ADMIN_PASSWORD" in done.stderr and "make secrets" in done.stderr


def test_a_secret_file_that_is_missing_is_named(tmp_path):
    done = subprocess.run([str(DOCKER / "secrets-env.sh"), "true"], capture_output=True, text=True, timeout=60,
                          env=_clean_env(PREFECT_API_AUTH_STRING_FILE=str(tmp_path / "nope")))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: PREFECT_API_AUTH_STRING_FILE={tmp_path / 'nope'} is not a readable file: "
                                   "run 'make secrets', or set PREFECT_API_AUTH_STRING")


def test_make_secrets_writes_private_random_secrets_once(tmp_path):
    target = tmp_path / "secrets"
    make = ["make", "-s", "-C", str(REPO), "secrets", f"SECRETS={target}"]
    subprocess.run(make, check=True, capture_output=True, timeout=60)
    files = {p.name: p.read_text() for p in target.iterdir()}
    assert sorted(files) == ["mlflow_admin_password", "mlflow_flask_secret_key", "postgres_password",
                             "prefect_auth_string"]
    assert files["prefect_auth_string"].startswith("admin:")
    assert len(set(files.values())) == 4 and all(len(v.strip()) >= 30 for v in files.values())
    assert {oct(p.stat().st_mode & 0o777) for p in target.iterdir()} == {"0o600"}
    assert oct(target.stat().st_mode & 0o777) == "0o700"
    subprocess.run(make, check=True, capture_output=True, timeout=60)
    assert {p.name: p.read_text() for p in target.iterdir()} == files  # never overwritten


def _run(cfg, tmp_path, resume=False):
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    return train_flow(params_file=str(params), resume=resume, return_state=True)


def _credentials(monkeypatch, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def _assert_logged_and_registered(url: str, run_id: str, model: str, epochs: int) -> None:
    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_acc", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key
    assert run.data.params["epochs"] == str(epochs)
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/best_model.pth",
                                                                             "checkpoints/final_model.pth"}
    [logged] = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")
    champion = client.get_model_version_by_alias(model, "champion")
    assert (champion.run_id, champion.source) == (run_id, logged.model_uri)


@pytest.mark.slow  # the resume of the wrong-credentials test below logs and registers with the right ones too
@pytest.mark.usefixtures("prefect_server")
def test_a_run_with_the_right_credentials_logs_and_registers(make_config, mlflow_auth, tmp_path, monkeypatch):
    url, password = mlflow_auth
    _credentials(monkeypatch, password)
    cfg = make_config(epochs=2, mlflow_tracking_uri=url, mlflow_experiment="auth-right",
                      registered_model_name="auth-right")
    state = _run(cfg, tmp_path)
    assert state.is_completed(), state.message
    _assert_logged_and_registered(url, state.result().mlflow_run_id, "auth-right", 2)


@pytest.mark.usefixtures("prefect_server")
def test_wrong_credentials_fail_the_run_naming_the_variables_and_resume_logs_everything(
        make_config, mlflow_auth, tmp_path, monkeypatch):
    url, password = mlflow_auth
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    _credentials(monkeypatch, f"wrong-{password}")
    cfg = make_config(epochs=2, mlflow_tracking_uri=url, mlflow_experiment="auth-wrong",
                      registered_model_name="auth-wrong")
    failed = _run(cfg, tmp_path)

    assert failed.is_failed()
    assert "\n" not in failed.message
    assert f"MLflow at {url} refused the credentials (HTTP 401)" in failed.message
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in failed.message
    assert "rerun with --resume" in failed.message and str(cfg.checkpoints_dir) in failed.message
    for name in (ckpt.BEST, ckpt.FINAL, ckpt.LAST):
        assert (cfg.checkpoints_dir / name).is_file()  # the training is kept
    assert ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.FINAL)["epoch"] == 2
    _credentials(monkeypatch, password)
    assert MlflowClient(url).get_experiment_by_name("auth-wrong") is None  # nothing got in

    resumed = _run(cfg, tmp_path, resume=True)
    assert resumed.is_completed(), resumed.message
    # The first attempt never opened an MLflow run: the resume opens one and logs the whole history.
    client = MlflowClient(url)
    [run] = client.search_runs([client.get_experiment_by_name("auth-wrong").experiment_id])
    _assert_logged_and_registered(url, run.info.run_id, "auth-wrong", 2)


# ---- Prefect -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_auth(tmp_path_factory):
    """(API URL, auth string, PREFECT_HOME for clients) of `prefect server start` behind its auth string,
    read from a file through docker/secrets-env.sh as `make server` does."""
    root = tmp_path_factory.mktemp("prefect-auth")
    auth = f"{ADMIN}:{secrets.token_urlsafe(24)}"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = prefect_env(root / "server-home", api_url)
    env["PREFECT_SERVER_API_AUTH_STRING_FILE"] = str(_secret(root / "prefect_auth_string", auth))
    (root / "server-home").mkdir()
    cmd = [str(DOCKER / "secrets-env.sh"), str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
           "--port", str(port), "--no-scheduler", "--analytics-off"]
    with running_server(f"prefect server with auth on port {port}", cmd, f"{api_url}/health",
                        root / "server.log", env=env):
        yield api_url, auth, root / "client-home"


def _prefect(prefect_auth, *args: str, auth: str | None) -> subprocess.CompletedProcess:
    api_url, _, home = prefect_auth
    env = prefect_env(home, api_url)
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth
    return subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True, text=True, timeout=120)


def test_prefect_refuses_clients_without_its_auth_string(prefect_auth):
    api_url, auth, _ = prefect_auth
    assert _status(f"{api_url}/flows/filter", method="POST") == 401
    assert _status(f"{api_url}/flows/filter", "admin:wrong", method="POST") == 401
    assert _status(f"{api_url}/flows/filter", auth, method="POST") == 200
    assert _status(f"{api_url}/health") == 200  # what `make worker` polls first

    assert _prefect(prefect_auth, "work-pool", "ls", auth=None).returncode != 0
    assert _prefect(prefect_auth, "work-pool", "ls", auth="admin:wrong").returncode != 0
    created = _prefect(prefect_auth, "work-pool", "create", "auth-pool", "--type", "process", auth=auth)
    assert created.returncode == 0, created.stdout + created.stderr
    assert "auth-pool" in _prefect(prefect_auth, "work-pool", "ls", auth=auth).stdout


def test_make_worker_checks_the_auth_string_first(prefect_auth):
    """docker/check-prefect-server.py, which `make worker` and `make deploy` run before Prefect."""
    api_url, auth, _ = prefect_auth

    def check(value: str | None) -> subprocess.CompletedProcess:
        env = _clean_env(**({"PREFECT_API_AUTH_STRING": value} if value else {}))
        return subprocess.run([sys.executable, str(DOCKER / "check-prefect-server.py"), api_url], env=env,
                              capture_output=True, text=True, timeout=60)

    assert check(auth).returncode == 0
    refused = check("admin:wrong")
    assert refused.returncode == 1 and refused.stderr.strip().startswith(
        f"error: the Prefect server at {api_url} refused the auth string in PREFECT_API_AUTH_STRING: "
        "set PREFECT_API_AUTH_STRING to its PREFECT_SERVER_API_AUTH_STRING")
    assert "without an auth string" in check(None).stderr


def test_a_training_run_reports_to_a_prefect_server_with_auth(prefect_auth, make_config, tmp_path):
    """The command line against the server, the auth string in PREFECT_API_AUTH_STRING: the flow run,
    its epochs and its progress artifact are on the server."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    api_url, auth, home = prefect_auth
    cfg = make_config(epochs=2)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    env = prefect_env(home, api_url)
    env["PREFECT_API_AUTH_STRING"] = auth
    done = subprocess.run([sys.executable, "flows/train_flow.py", "--params", str(params)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    async def server_view():
        async with PrefectClient(api_url, auth_string=auth) as client:
            runs = await client.read_flow_runs()
            progress = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-progress"])))
            return runs, progress

    runs, progress = asyncio.run(server_view())
    assert [r.state.type.value for r in runs] == ["COMPLETED"]  # the only flow run on this server
    assert [a.data for a in progress] == [100.0]
