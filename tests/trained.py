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


def calibrated_weights() -> Path:
    """A mobilenet_v3_small ImageNet-shaped state dict (1000 classes) for `weights_path`: random
    weights whose BatchNorm statistics are those of images, as pretrained weights' are. Random init
    alone is no stand-in: its BatchNorm statistics (mean 0, variance 1) let the activations fade
    through the blocks, so at 32 px every image gets the same logits (probabilities 0.499/0.501 after
    an epoch) and a test comparing outputs could not tell one preprocessing from another."""
    if "weights" not in _SHARED_FILES:
        import torch
        from torch import nn
        from torchvision import models

        torch.manual_seed(0)
        model = models.mobilenet_v3_small()
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in norms:
            bn.momentum = None  # a plain average over the calibration batches
            bn.reset_running_stats()
        with torch.no_grad():
            for _ in range(4):
                model.train()(torch.rand(16, 3, 32, 32).sub(0.45).div(0.226))
        for bn in norms:
            bn.momentum = 0.01  # torchvision's, so the state dict is what the real one looks like
        path = _shared_root() / "mobilenet_v3_small-calibrated.pth"
        torch.save(model.state_dict(), path)
        _SHARED_FILES["weights"] = path
    return _SHARED_FILES["weights"]


def _shared_root() -> Path:
    if "root" not in _SHARED_FILES:
        root = Path(tempfile.mkdtemp(prefix="harv-train-shared-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED_FILES["root"] = root
    return _SHARED_FILES["root"]


_SHARED_FILES: dict[str, Path] = {}


def train_tiny(root: Path, classes: tuple[str, ...] = ("cat", "dog"), epochs: int = 1) -> tuple[TrainConfig, Path]:
    """MobileNetV3-Small from calibrated weights at 32 px on a colour-coded ImageFolder, one epoch
    (val accuracy 1.0, its outputs depend on the image); returns (cfg, best_model.pth)."""
    data = write_image_folder(root / "data", classes=classes)
    cfg = load_config(None, {
        "model_name": "mobilenet_v3_small", "pretrained": True, "weights_path": str(calibrated_weights()),
        "epochs": epochs, "batch_size": 4, "img_size": 32, "lr": 0.001, "classes": None, "data_dir": str(data),
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


# torchvision's ImageNet normalization, written out here rather than read from the code under test.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def oracle_logits(checkpoint: Path, images: list[Path]):
    """What a plain PyTorch user computes for a mobilenet_v3_small checkpoint, independently of
    harv_train's loading, decoding and normalization: torchvision's own model and transforms
    (Resize, ToTensor, Normalize), one forward pass. Returns logits [N, classes]."""
    import torch
    from PIL import Image
    from torchvision import models, transforms

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["model_name"] == "mobilenet_v3_small"
    model = models.mobilenet_v3_small(num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    size = state["img_size"]
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        return model.eval()(torch.stack([transform(Image.open(p).convert("RGB")) for p in images]))


_SHARED: dict[tuple[str, ...], tuple[TrainConfig, Path]] = {}


def shared_tiny(classes: tuple[str, ...] = ("cat", "dog")) -> tuple[TrainConfig, Path]:
    """One trained checkpoint per class set for the whole test session: tests only read it (a test that
    changes the data copies it first)."""
    if classes not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="harv-train-tiny-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED[classes] = train_tiny(root, classes)
    return _SHARED[classes]
