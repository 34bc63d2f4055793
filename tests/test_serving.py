"""The registered champion as MLflow serves it: image files in (base64), class and probabilities out,
with pickles refused everywhere (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, here and in the server).

The model is logged by the tracker the flow uses (MlflowTracker.log_model), from the shared tiny
checkpoint, and registered as champion; the images are that checkpoint's held-out val split."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from harv_train.core import checkpoints as ckpt
from harv_train.tracking.mlflow_tracker import MlflowTracker
from harv_train.tracking.pyfunc_model import RUNTIME_ENV
from tests.servers import BIN, free_port, running_server
from tests.trained import oracle_logits, shared_tiny

NAME = "served"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """(tracking URI, root, cfg, val images) with the tiny checkpoint logged and registered as @champion."""
    from mlflow.tracking import MlflowClient

    cfg, best = shared_tiny()
    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("serving-tests", artifact_location=(root / "mlruns").as_uri())
    tracker = MlflowTracker(uri, "serving-tests")
    assert tracker.start(None, "serving", {})
    state = ckpt.load_checkpoint(best)
    model_uri = tracker.log_model(state, {"harv_train.best_epoch": str(state["epoch"])})
    registration = tracker.register_model(NAME, model_uri, state["best_val_acc"])
    tracker.end("FINISHED")
    assert registration and registration.promoted, tracker.failures
    images = sorted(Path(cfg.data_dir, "val").rglob("*.png"))
    return uri, root, cfg, images


@pytest.fixture
def no_pickles(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


def _load(uri: str, dst: Path, **kwargs):
    import mlflow.pyfunc

    dst.mkdir()
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion", dst_path=str(dst), **kwargs)


def _probabilities(rows, classes):
    return [[row["probabilities"][c] for c in classes] for row in rows]


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_the_champion_loads_without_pickles_and_gives_the_checkpoints_softmax(champion, no_pickles, tmp_path,
                                                                              runtime):
    uri, _, cfg, images = champion
    model = _load(uri, tmp_path / "model", model_config={"runtime": runtime})
    rows = model.predict(pd.DataFrame({"image": [b64(p.read_bytes()) for p in images]}))

    want = oracle_logits(cfg.checkpoints_dir / ckpt.BEST, images).softmax(1)
    assert want.std(0).min() > 1e-3  # outputs that depend on the image
    classes = ["cat", "dog"]
    for row, probs, path in zip(rows, want.tolist(), images, strict=True):
        assert [row["probabilities"][c] for c in classes] == pytest.approx(probs, abs=1e-5)
        assert row["class"] == path.parent.name == classes[probs.index(max(probs))]
        assert row["probability"] == max(row["probabilities"].values())


def test_the_logged_model_is_weights_code_and_a_card_with_no_pickle(champion, tmp_path):
    import yaml

    uri, _, cfg, _ = champion
    _load(uri, tmp_path / "model")
    files = {p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert {"artifacts/model.safetensors", "artifacts/model.json", "artifacts/model.onnx", "pyfunc_entry.py",
            "code/harv_train/tracking/pyfunc_model.py", "code/harv_train/core/data.py"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".pyc"))]
    flavor = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_entry.py") and "python_model" not in flavor
    card = json.loads((tmp_path / "model" / "artifacts" / "model.json").read_text())
    state = ckpt.load_checkpoint(cfg.checkpoints_dir / ckpt.BEST)
    assert (card["classes"], card["img_size"], card["interpolation"]) == (state["classes"], 32, "bilinear")
    assert (card["mean"], card["std"]) == (list(state["mean"]), list(state["std"]))


def _corrupt_png(path: Path) -> bytes:
    return path.read_bytes()[:60]  # header and a cut-off chunk


def test_a_bad_image_gets_an_error_in_its_row_and_leaves_the_others_alone(champion, no_pickles, tmp_path):
    uri, _, _, images = champion
    model = _load(uri, tmp_path / "model")
    good = [b64(p.read_bytes()) for p in images[:2]]
    request = [good[0], b64(_corrupt_png(images[0])), "not base64 at all!", good[1], None, b64(b"")]
    rows = model.predict(pd.DataFrame({"image": request}))
    alone = model.predict(pd.DataFrame({"image": good}))

    assert [sorted(r) for r in rows] == [["class", "probabilities", "probability"], ["error"], ["error"],
                                         ["class", "probabilities", "probability"], ["error"], ["error"]]
    assert [rows[0], rows[3]] == alone  # the bad rows change nothing for the good ones
    assert rows[1]["error"].startswith("cannot read image in row 1 (")
    assert rows[2]["error"] == "row 2 is not base64: send each image file base64-encoded"
    assert rows[4]["error"].startswith("row 4 holds no image")
    assert rows[5]["error"].startswith("row 5 is empty")


def test_an_empty_request_is_refused_with_a_clear_message(champion, no_pickles, tmp_path):
    uri, _, _, _ = champion
    model = _load(uri, tmp_path / "model")
    with pytest.raises(MlflowException, match="the request holds no images: send one or more base64") as info:
        model.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))
    assert info.value.get_http_status_code() == 400


# ---- the real `mlflow models serve` on loopback -----------------------------------------------------


def serve_command(port: int) -> list[str]:
    return [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port)]


def serve_env(uri: str, **extra: str) -> dict[str, str]:
    # uvicorn, which `mlflow models serve` starts by name, is in the venv's bin.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", **extra}


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def images_request(values: list) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}).encode()


@pytest.fixture(scope="module")
def served(champion):
    uri, root, _, _ = champion
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running_server("mlflow models serve", serve_command(port), f"{url}/ping", root / "serve.log",
                        env=serve_env(uri)):
        yield url


def test_models_serve_answers_base64_images_with_their_class(champion, served):
    _, _, cfg, images = champion
    jpeg = io.BytesIO()
    Image.open(images[-1]).save(jpeg, format="JPEG", quality=95)
    status, body = post(served, images_request([b64(p.read_bytes()) for p in images] + [b64(jpeg.getvalue())]))
    assert status == 200, body
    rows = body["predictions"]
    assert [r["class"] for r in rows] == [p.parent.name for p in images] + [images[-1].parent.name]

    want = oracle_logits(cfg.checkpoints_dir / ckpt.BEST, images).softmax(1).tolist()
    for row, probs in zip(rows, want):
        assert [row["probabilities"]["cat"], row["probabilities"]["dog"]] == pytest.approx(probs, abs=1e-5)


def test_models_serve_takes_the_inputs_and_records_formats_too(champion, served):
    _, _, _, images = champion
    pair = [b64(images[0].read_bytes()), b64(images[-1].read_bytes())]
    want = [images[0].parent.name, images[-1].parent.name]
    for body in ({"inputs": {"image": pair}}, {"dataframe_records": [{"image": v} for v in pair]}):
        status, answer = post(served, json.dumps(body).encode())
        assert status == 200, answer
        assert [r["class"] for r in answer["predictions"]] == want


def test_models_serve_marks_a_corrupt_image_and_answers_the_rest(champion, served):
    _, _, _, images = champion
    status, body = post(served, images_request([b64(images[0].read_bytes()), b64(_corrupt_png(images[0])),
                                                b64(images[-1].read_bytes())]))
    assert status == 200, body
    first, bad, last = body["predictions"]
    assert (first["class"], last["class"]) == (images[0].parent.name, images[-1].parent.name)
    assert list(bad) == ["error"] and bad["error"].startswith("cannot read image in row 1")


@pytest.mark.parametrize("body", [images_request([]), b'{"inputs": {"image": []}}'], ids=["dataframe", "inputs"])
def test_models_serve_answers_an_empty_request_with_400(served, body):
    status, answer = post(served, body)
    assert status == 400
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "the request holds no images: send one or more base64-encoded image files" in answer["message"]


def test_the_runtime_variable_is_checked(champion, tmp_path, monkeypatch):
    uri, _, _, _ = champion
    monkeypatch.setenv(RUNTIME_ENV, "tensorflow")
    with pytest.raises(MlflowException, match=f"{RUNTIME_ENV}='tensorflow': choose one of onnx, torch"):
        _load(uri, tmp_path / "model")
