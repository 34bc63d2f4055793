"""Recipe options beside the seed's recipe: hflip, label_smoothing, backbone_lr_mult (each default-off:
tests/test_seed_recipe.py pins the defaults)."""

from __future__ import annotations

import copy

import pytest
import torch

from harv_train.core.augment import draw_augmentation
from harv_train.core.data import DecodedSplit
from harv_train.core.engine import Pipeline, Recipe, train_one_epoch
from harv_train.core.freezing import feature_blocks, freeze_early_blocks, trainable_parameters
from harv_train.core.models import build_architecture
from harv_train.core.run_state import RunState
from harv_train.core.session import TrainingSession


def test_hflip_zero_never_flips_and_leaves_the_other_draws_alone():
    seed = draw_augmentation(64, torch.Generator().manual_seed(3))
    never = draw_augmentation(64, torch.Generator().manual_seed(3), hflip=0.0)
    assert seed.flip.any() and not never.flip.any()
    assert torch.equal(seed.angle, never.angle) and torch.equal(seed.factors, never.factors)
    assert torch.equal(seed.order, never.order)


def _train_loss(model, split, smoothing: float) -> float:
    """One epoch at lr 0 (the weights stay) from a fixed seed: the mean training loss of the same batches."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=0.0)
    torch.manual_seed(0)
    pipeline = Pipeline(mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"), channels_last=False, num_workers=0)
    result = train_one_epoch(model, 0, optimizer, split, 4, pipeline, torch.Generator().manual_seed(0),
                             progress=False, recipe=Recipe(label_smoothing=smoothing))
    return result.loss


def test_label_smoothing_mixes_the_loss_with_the_uniform_target():
    """Cross-entropy is linear in the target: the loss at 0.5 is the mean of those at 0 and at 1."""
    torch.manual_seed(0)
    model = build_architecture("mobilenet_v3_small", 3)
    freeze_early_blocks(model, 0)
    g = torch.Generator().manual_seed(1)
    split = DecodedSplit(classes=["a", "b", "c"], paths=[f"{i}.png" for i in range(8)],
                         labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
                         images=torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                         img_size=32, interpolation="bilinear")
    plain, half, uniform = (_train_loss(model, split, s) for s in (0.0, 0.5, 1.0))
    assert half == pytest.approx((plain + uniform) / 2, rel=1e-5)
    assert abs(half - plain) > 1e-3


def test_backbone_lr_mult_gives_the_backbone_a_lower_lr_and_survives_a_resume(make_config):
    cfg = make_config(epochs=1, backbone_lr_mult=0.1, freeze_ratio=0.5)
    session = TrainingSession(cfg)
    session.start(None)
    session.train_epoch(0, progress=False)
    restored = RunState.restore(cfg, session.last_path, torch.device("cpu"))
    head, backbone = restored.optimizer.param_groups
    assert (head["lr"], backbone["lr"]) == (pytest.approx(1e-3), pytest.approx(1e-4))
    in_stages = {id(p) for p in feature_blocks(restored.model).parameters()}
    assert backbone["params"] and all(id(p) in in_stages for p in backbone["params"])
    assert head["params"] and not any(id(p) in in_stages for p in head["params"])
    assert len(head["params"]) + len(backbone["params"]) == len(trainable_parameters(restored.model))
    assert restored.optimizer.state  # Adam's moments came back with the groups


def test_cosine_schedule_warms_up_then_decays_and_a_resume_continues_it(make_config, tmp_path):
    """lr 1e-3, 3 epochs, 1 of warmup: 1e-3 x (1/2, 1, (1 + cos(pi / 2)) / 2) = (5e-4, 1e-3, 5e-4)."""
    from tests.trained import train_epochs

    cfg = make_config(epochs=3, schedule="cosine", warmup_epochs=1, artifacts_dir=str(tmp_path / "whole"))
    whole = [m.lr for m in train_epochs(cfg)]
    assert whole == pytest.approx([5e-4, 1e-3, 5e-4])
    cfg = make_config(epochs=3, schedule="cosine", warmup_epochs=1, artifacts_dir=str(tmp_path / "resumed"))
    first = TrainingSession(cfg)
    first.start(None)
    first.train_epoch(0, progress=False)
    again = TrainingSession(cfg)  # a new process: the state comes from last.pth
    assert [again.train_epoch(e, progress=False).lr for e in (1, 2)] == pytest.approx(whole[1:])


def test_warmup_without_the_cosine_schedule_is_refused(make_config):
    from harv_train.errors import ConfigError

    with pytest.raises(ConfigError, match="warmup_epochs 2 needs schedule: cosine"):
        make_config(warmup_epochs=2)


@pytest.mark.parametrize("change", [{"backbone_lr_mult": 0.5}, {"schedule": "cosine"}])
def test_resume_with_other_optimizer_groups_or_schedule_is_refused_in_one_line(make_config, change):
    from harv_train.core.checks import check_resumable
    from harv_train.errors import CheckpointError
    from tests.trained import start_run

    start_run(make_config(epochs=1))
    key, value = next(iter(change.items()))
    with pytest.raises(CheckpointError, match=f"was trained with {key} .*, this run has {value}: its optimizer"):
        check_resumable(make_config(epochs=1, **change), ["cat", "dog"])


def test_recipe_modern_presets_its_keys_and_explicit_keys_win():
    from harv_train.config import MODERN_KEYS, MODERN_RECIPE, load_config

    modern = load_config(None, {"recipe": "modern"})
    assert (modern.schedule, modern.warmup_epochs, modern.lr, modern.label_smoothing) == ("cosine", 1, 0.003, 0.1)
    assert {k: getattr(modern, k) for k in MODERN_RECIPE} == MODERN_RECIPE
    mine = load_config(None, {"recipe": "modern", "lr": 0.01, "warmup_epochs": 0, "unfreeze": {}})
    assert (mine.schedule, mine.warmup_epochs, mine.lr, mine.unfreeze) == ("cosine", 0, 0.01, {})
    # A run's resolved params (params.yaml in its checkpoints folder) hold the preset's values as keys.
    assert {k: modern.to_dict()[k] for k in MODERN_KEYS} == {**MODERN_RECIPE, "unfreeze": modern.unfreeze}


@pytest.mark.parametrize(("epochs", "freeze_ratio", "unfreeze"), [
    (6, 0.7, {4: 0.35}),   # the measured run: epochs 4-6 train half of the frozen stages too
    (7, 0.7, {5: 0.35}),   # an odd length: the shorter half
    (12, 0.5, {7: 0.25}),
    (5, 0.7, {}),          # too short (at 3 epochs, one unfrozen epoch lost accuracy)
    (6, 0.0, {}),          # nothing frozen
])
def test_recipe_modern_unfreezes_half_the_frozen_stages_for_the_second_half_of_the_run(epochs, freeze_ratio, unfreeze):
    from harv_train.config import load_config

    cfg = load_config(None, {"recipe": "modern", "epochs": epochs, "freeze_ratio": freeze_ratio})
    assert cfg.unfreeze == unfreeze


def test_recipe_seed_is_the_default_and_sets_nothing(make_config):
    from harv_train.config import TrainConfig

    assert make_config().recipe == "seed"
    assert make_config(recipe="seed").to_dict() == make_config().to_dict() | {"recipe": "seed"}
    assert TrainConfig.model_fields["recipe"].default == "seed"
