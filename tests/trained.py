"""A real, tiny trained checkpoint for the evaluation, export and predict tests (a few seconds)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from harv_train.config import TrainConfig, load_config
from harv_train.core import checkpoints as ckpt
from harv_train.core.run_state import EpochMetrics
from harv_train.core.session import TrainingSession
from tests.images import write_image_folder


def train_tiny(root: Path, classes: tuple[str, ...] = ("cat", "dog"), epochs: int = 1) -> tuple[TrainConfig, Path]:
    """Random-init MobileNetV3-Small at 32 px on a colour-coded ImageFolder; returns (cfg, best_model.pth)."""
    data = write_image_folder(root / "data", classes=classes)
    cfg = load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": False, "epochs": epochs, "batch_size": 4,
        "img_size": 32, "lr": 0.001, "classes": None, "data_dir": str(data),
        "artifacts_dir": str(root / "artifacts"), "num_workers": 0,
    })
    train_epochs(cfg, epochs)
    return cfg, cfg.checkpoints_dir / ckpt.BEST


def start_run(cfg: TrainConfig) -> None:
    """Epoch 0 in last.pth, as a run's start writes it."""
    TrainingSession(cfg).start(None)


def train_epochs(cfg: TrainConfig, epochs: int | None = None) -> list[EpochMetrics]:
    """A new run of `epochs` (default cfg.epochs) epochs in one session, without Prefect."""
    session = TrainingSession(cfg)
    session.start(None)
    return [session.train_epoch(e, progress=False) for e in range(cfg.epochs if epochs is None else epochs)]


_SHARED: dict[tuple[str, ...], tuple[TrainConfig, Path]] = {}


def shared_tiny(classes: tuple[str, ...] = ("cat", "dog")) -> tuple[TrainConfig, Path]:
    """One trained checkpoint per class set for the whole test session: tests only read it (a test that
    changes the data copies it first)."""
    if classes not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="harv-train-tiny-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED[classes] = train_tiny(root, classes)
    return _SHARED[classes]
