"""A real, tiny trained checkpoint for the evaluation, export and predict tests (a few seconds)."""

from __future__ import annotations

from pathlib import Path

from tasks import checkpoints as ckpt
from tasks import trainer
from tasks.config import TrainConfig, load_config
from tests.conftest import write_image_folder


def train_tiny(root: Path, classes: tuple[str, ...] = ("cat", "dog"), epochs: int = 1) -> tuple[TrainConfig, Path]:
    """Random-init MobileNetV3-Small at 32 px on a colour-coded ImageFolder; returns (cfg, best_model.pth)."""
    data = write_image_folder(root / "data", classes=classes)
    cfg = load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": False, "epochs": epochs, "batch_size": 4,
        "img_size": 32, "lr": 0.001, "classes": None, "data_dir": str(data),
        "artifacts_dir": str(root / "artifacts"), "num_workers": 0,
    })
    trainer.start_run(cfg, sorted(classes), None, lambda _: None)
    for epoch in range(epochs):
        trainer.run_epoch(cfg, epoch, lambda _: None, progress=False)
    return cfg, cfg.checkpoints_dir / ckpt.BEST
