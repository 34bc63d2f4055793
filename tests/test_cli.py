"""`python flows/train_flow.py`: bad input is one line on stderr, exit code 2, nothing overwritten."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import lock_held_elsewhere
from flows.train_flow import main
from harv_train.core import checkpoints as ckpt
from harv_train.config import load_config, write_params_file
from tests.trained import start_run, train_epochs

REPO = Path(__file__).resolve().parent.parent


def _cli(cfg, tmp_path, capsys, *extra):
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    code = main(["--params", str(params), *extra])
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_error(code, err, expected):
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda d: shutil.rmtree(d), "does not exist: put images in"),
        (lambda d: shutil.rmtree(d / "train"), "train does not exist"),
        (lambda d: shutil.rmtree(d / "val"), "val does not exist"),
        (lambda d: [f.unlink() for f in (d / "val" / "dog").iterdir()], "val/dog has no images"),
        (lambda d: (d / "train" / "cat" / "cat_0.png").write_bytes(b"\x89PNG garbage"), "cannot read image"),
        (lambda d: shutil.copytree(d / "val" / "cat", d / "val" / "cow"), "only in val: cow"),
        (lambda d: _png_header_only(d / "train" / "dog" / "huge.png", 15000, 12000),
         "huge.png (Image size (180000000 pixels) exceeds limit of 178956970 pixels"),
    ],
    ids=["no-data-dir", "no-train", "no-val", "empty-class", "corrupt-image", "val-class-not-in-train",
         "over-the-pixel-limit"],
)
def test_bad_data_is_one_line_error(make_config, image_folder, tmp_path, capsys, breakage, expected):
    breakage(image_folder)
    code, err = _cli(make_config(), tmp_path, capsys)
    _assert_one_line_error(code, err, expected)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height and holds no pixels: PIL refuses it on opening, past its limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_classes_not_matching_folders(make_config, tmp_path, capsys):
    code, err = _cli(make_config(classes=["ProfA", "Room1"]), tmp_path, capsys)
    _assert_one_line_error(code, err, "only in params: ProfA, Room1; only in folders: cat, dog")


def test_unknown_params_key(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("epochz: 3\n")
    _assert_one_line_error(main(["--params", str(tmp_path / "p.yaml")]), capsys.readouterr().err,
                           "valid keys are: model_name")


def test_value_out_of_range_from_set(capsys):
    _assert_one_line_error(main(["--set", "freeze_ratio=2"]), capsys.readouterr().err,
                           "freeze_ratio must be a number from 0 to 1, got 2")


def test_unknown_model_name(capsys):
    _assert_one_line_error(main(["--set", "model_name=vit_b_16"]), capsys.readouterr().err,
                           "model_name must be a torchvision classification model of the families in docs/params.md")


def test_pretrained_weights_unavailable_offline(make_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    code, err = _cli(make_config(pretrained=True), tmp_path, capsys)
    _assert_one_line_error(code, err, "pretrained weights for mobilenet_v3_small are not available offline")


@pytest.mark.parametrize(("change", "trained", "now"), [
    ({"model_name": "efficientnet_lite0"}, "was trained as mobilenet_v3_small", "this run is efficientnet_lite0"),
    ({"img_size": 64}, "at 32px, freeze_ratio 0.7;", "at 64px, freeze_ratio 0.7:"),
    ({"freeze_ratio": 0.5}, "at 32px, freeze_ratio 0.7;", "at 32px, freeze_ratio 0.5:"),
], ids=["model", "image-size", "freeze-ratio"])
def test_resume_with_another_model_image_size_or_freeze_ratio_is_refused(make_config, tmp_path, capsys, change,
                                                                        trained, now):
    cfg = make_config(epochs=1)
    start_run(cfg)
    before = (cfg.checkpoints_dir / ckpt.LAST).read_bytes()
    code, err = _cli(make_config(**change), tmp_path, capsys, "--resume")
    _assert_one_line_error(code, err, trained)
    assert now in err
    assert (cfg.checkpoints_dir / ckpt.LAST).read_bytes() == before


def _nothing_written(cfg, tmp_path, *kept: Path) -> None:
    """No checkpoint, no MLflow store: no file but the artifacts_dir lock and what the test put there
    (the checks may leave empty folders)."""
    assert not (tmp_path / "mlflow.db").exists()
    artifacts = Path(cfg.artifacts_dir)
    written = sorted(p for p in artifacts.rglob("*")
                     if p.is_file() and p.name != ".lock" and p not in kept) if artifacts.is_dir() else []
    assert written == []


def test_an_artifacts_dir_that_cannot_be_created_is_one_line_and_writes_nothing(make_config, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = make_config(artifacts_dir=str(tmp_path / "a-file" / "artifacts"))
    code, err = _cli(cfg, tmp_path, capsys)
    _assert_one_line_error(code, err, "cannot create artifacts_dir")
    _nothing_written(cfg, tmp_path)


def test_a_checkpoints_folder_that_cannot_be_written_is_one_line_and_writes_nothing(make_config, tmp_path, capsys):
    cfg = make_config()
    cfg.checkpoints_dir.parent.mkdir(parents=True)
    cfg.checkpoints_dir.write_text("a file where the checkpoints go")
    code, err = _cli(cfg, tmp_path, capsys)
    _assert_one_line_error(code, err, f"cannot write to {cfg.checkpoints_dir}")
    _nothing_written(cfg, tmp_path, cfg.checkpoints_dir)
    assert cfg.checkpoints_dir.read_text() == "a file where the checkpoints go"


def test_no_space_for_the_checkpoints_is_one_line_and_writes_nothing(make_config, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB free
    cfg = make_config()
    code, err = _cli(cfg, tmp_path, capsys)
    _assert_one_line_error(code, err, "not enough free disk space in")
    assert "1 MiB free, checkpoints need about" in err
    _nothing_written(cfg, tmp_path)


def test_resume_without_a_checkpoint(make_config, tmp_path, capsys):
    code, err = _cli(make_config(), tmp_path, capsys, "--resume")
    _assert_one_line_error(code, err, "--resume: no checkpoint at")


def test_a_failed_run_never_loses_the_earlier_best_model(make_config, image_folder, tmp_path, capsys):
    cfg = make_config(epochs=1)
    train_epochs(cfg)
    best = cfg.checkpoints_dir / ckpt.BEST
    before = best.read_bytes()
    (image_folder / "val" / "cat" / "broken.jpg").write_bytes(b"")
    code, _ = _cli(cfg, tmp_path, capsys)
    assert code == 2 and best.read_bytes() == before


def test_a_second_run_on_the_same_artifacts_dir_is_refused(make_config, tmp_path, capsys):
    cfg = make_config()
    with lock_held_elsewhere(cfg.artifacts_dir) as holder:
        code, err = _cli(cfg, tmp_path, capsys)
        _assert_one_line_error(code, err, f"is in use by a running training (pid {holder.pid})")


def test_command_line_prints_no_traceback(tmp_path):
    """The real command, as a user runs it (in tmp_path: its default artifacts_dir is ./artifacts)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--params", str(REPO / "params.yaml"),
         "--set", f"data_dir={tmp_path / 'nowhere'}", "--set", "classes=null"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: data_dir") and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "Prefect: temporary server" not in result.stdout  # bad input never reaches the flow


# Loaded first thing by every Python process started with it on PYTHONPATH: records each process it
# starts (Prefect's temporary server is one) and the moment Prefect is imported, in the file named by
# $PROCESS_LOG, as it happens (the command ends with os._exit: no exit hook of ours would run).
_RECORDER = """
import os, subprocess, sys
_log = os.environ["PROCESS_LOG"]
def _record(line):
    with open(_log, "a") as f:
        f.write(line + "\\n")
_popen_init = subprocess.Popen.__init__
def _init(self, args, *a, **k):
    _record("started " + " ".join(map(str, args if isinstance(args, (list, tuple)) else [args])))
    _popen_init(self, args, *a, **k)
subprocess.Popen.__init__ = _init
class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "prefect":
            _record("imported prefect")
        return None
sys.meta_path.insert(0, _Watch())
"""


def _run_recorded(tmp_path, *args):
    recorder = tmp_path / "recorder"
    recorder.mkdir(exist_ok=True)
    (recorder / "sitecustomize.py").write_text(_RECORDER)
    log = tmp_path / "processes.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(recorder), "PROCESS_LOG": str(log)}
    env.pop("PREFECT_API_URL", None)  # with none, the command would start Prefect's temporary server
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return result, (log.read_text().splitlines() if log.exists() else [])


def test_the_process_recorder_sees_the_early_server_start(tmp_path):
    """The check below is only worth something if it sees a server being started."""
    _, events = _run_recorded(tmp_path, "-c", "from harv_train.cli.startup import start_early_server\n"
                              "server = start_early_server(); server.stop()")
    assert any(e.startswith("started ") and "uvicorn" in e and "prefect.server" in e for e in events), events


@pytest.mark.parametrize(("script", "args", "code"), [
    ("train_flow.py", ["--help"], 0), ("train_flow.py", ["--bogus"], 2), ("train_flow.py", ["--set", "lr"], 2),
    ("train_flow.py", ["--set", "epochs=three"], 2),
    ("evaluate_flow.py", ["--help"], 0), ("evaluate_flow.py", ["--checkpoint", "x.pth"], 2),
])
def test_help_and_usage_errors_answer_with_argparse_codes_before_any_server(tmp_path, script, args, code):
    result, events = _run_recorded(tmp_path, f"flows/{script}", *args)
    assert result.returncode == code, result.stderr
    assert events == [], events  # no process started (no server), Prefect not even imported


def test_command_line_trains_on_images_that_do_not_fit_the_cache(image_folder, tmp_path):
    """Out of cache, the images are decoded by DataLoader worker processes (num_workers, default 2),
    forked after the flow run's Prefect log service started: every worker ended with exit code 1 and
    each epoch failed with "DataLoader worker (pid ...) exited unexpectedly"."""
    assert load_config(REPO / "params.yaml").num_workers > 0  # what this test is about: the default
    settings = {
        "pretrained": "false", "epochs": "1", "batch_size": "4", "img_size": "32", "classes": "null",
        "data_dir": str(image_folder), "artifacts_dir": str(tmp_path / "artifacts"),
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": "null",
        "export": "false", "epoch_retries": "0",
        "cache_max_mb": "0",  # never cached: every batch comes from the worker processes
    }
    result = subprocess.run(  # in tmp_path: MLflow's default artifact root (./mlruns) lands there
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--params", str(REPO / "params.yaml"),
         *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exited unexpectedly" not in result.stdout + result.stderr
    assert (tmp_path / "artifacts" / "checkpoints" / ckpt.BEST).is_file()



def test_the_command_line_trains_from_unicode_paths_with_spaces_and_symlinked_class_folders(tmp_path):
    from tests.images import write_image_folder

    real = write_image_folder(tmp_path / "real dätä", classes=("Prof Ä", "Room 1"))
    data = tmp_path / "linked data ü"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        for name in ("Prof Ä", "Room 1"):
            (data / split / name).symlink_to(real / split / name, target_is_directory=True)
    artifacts = tmp_path / "ärtifacts and spaces"
    settings = {
        "pretrained": "false", "epochs": "1", "batch_size": "4", "img_size": "32", "classes": "[Prof Ä, Room 1]",
        "data_dir": str(data), "artifacts_dir": str(artifacts), "num_workers": "0", "export": "false",
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registered_model_name": "null",
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "flows" / "train_flow.py"), "--params", str(REPO / "params.yaml"),
         *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = ckpt.load_checkpoint(artifacts / "checkpoints" / ckpt.BEST)
    assert best["classes"] == ["Prof Ä", "Room 1"] and best["history"][0]["train_batches"] == 4
    assert (artifacts / "eval" / "report.json").is_file()
