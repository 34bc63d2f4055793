"""augment: trivial | randaugment and random_resized_crop: torchvision's pixels, per sample, seeded, resumable."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from harv_train.config import load_config
from harv_train.core.data import DecodedSplit
from harv_train.core.engine import Pipeline, Recipe, train_one_epoch
from harv_train.core.freezing import freeze_early_blocks, trainable_parameters
from harv_train.core.models import build_architecture
from harv_train.core.policies import BINS, OPS, SIGNED, PolicyDraws, apply_policy, augment_uint8, draw_policy, magnitudes
from harv_train.core.runtime import epoch_seed
from harv_train.errors import ConfigError
from tests.images import write_image_folder
from tests.trained import train_epochs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION = {"trivial": v2.TrivialAugmentWide, "randaugment": v2.RandAugment}


def _photos(n: int, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """Smooth images with edges and flat areas (not noise: Equalize, AutoContrast and Posterize then
    have something to do), uint8 [n, 3, h, w]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 5, 7, generator=g) * 255
    x = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _torchvision_chain(image: torch.Tensor, draws: PolicyDraws, i: int, policy: str) -> torch.Tensor:
    """Sample i through torchvision's own functional ops: resized_crop, horizontal_flip, then the policy's
    op dispatch with the same op and magnitude."""
    if draws.crop:
        image = TF.resized_crop(image, *draws.box[i].tolist(), list(image.shape[-2:]), antialias=True)
    if draws.flip[i]:
        image = TF.horizontal_flip(image)
    transform = TORCHVISION[policy]()
    for k in range(draws.op.shape[1]):
        image = transform._apply_image_or_video_transform(
            image, OPS[int(draws.op[i, k])], float(draws.magnitude[i, k]), interpolation=transform.interpolation,
            fill=transform._fill)
    return image


@pytest.mark.parametrize("policy", ["trivial", "randaugment"])
def test_every_op_at_every_bin_equals_torchvision(policy):
    """Sample i takes op i % 14 at bin i % 31, negated on odd i: every op and magnitude, both signs."""
    n, (h, w) = 14 * BINS, (40, 56)
    table = magnitudes(policy, h, w)
    op = torch.arange(n) % len(OPS)
    magnitude = torch.zeros(n, 1, dtype=torch.float64)
    for i in range(n):
        values = table[OPS[op[i]]]
        if values is not None:
            m = float(values[i % BINS])
            magnitude[i, 0] = -m if i % 2 and OPS[op[i]] in SIGNED else m
    draws = PolicyDraws(torch.zeros(n, dtype=torch.bool), torch.tensor([0, 0, h, w]).expand(n, 4), op.view(n, 1),
                        magnitude, crop=False)
    x = _photos(n, h, w)
    out = augment_uint8(x, draws)
    expected = torch.stack([_torchvision_chain(x[i], draws, i, policy) for i in range(n)])
    differing = (out != expected).any(dim=1)
    # The grid is built in the order of torchvision's matmul, so even nearest-neighbour ties go its way.
    assert int(differing.sum()) == 0, [OPS[int(o)] for o in op[differing.flatten(1).any(1)]]


@pytest.mark.parametrize("policy", ["trivial", "randaugment"])
def test_a_drawn_chain_with_crop_and_flip_equals_torchvision(policy):
    x = _photos(120)
    draws = draw_policy(len(x), torch.Generator().manual_seed(1), policy, (40, 56), hflip=0.5, crop_scale=0.3)
    assert draws.flip.any() and not draws.flip.all() and len(set(draws.op.flatten().tolist())) == len(OPS)
    expected = torch.stack([_torchvision_chain(x[i], draws, i, policy) for i in range(len(x))])
    assert torch.equal(augment_uint8(x, draws), expected)
    normalized = v2.functional.normalize(expected.float() / 255, MEAN, STD)
    out = apply_policy(x, draws, MEAN, STD, memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalized, atol=1e-5, rtol=0)


def test_the_op_lists_and_magnitudes_are_torchvisions():
    for policy, transform in TORCHVISION.items():
        space = transform._AUGMENTATION_SPACE
        assert tuple(space) == OPS and {k for k, (_, signed) in space.items() if signed} == SIGNED
        ours = magnitudes(policy, 40, 56)
        for name, (make, _) in space.items():
            expected = make(BINS, 40, 56)
            assert (ours[name] is None) == (expected is None) and (expected is None or torch.equal(ours[name], expected))


def test_crop_boxes_follow_random_resized_crop():
    draws = draw_policy(2000, torch.Generator().manual_seed(0), "trivial", (64, 64), crop_scale=0.35)
    top, left, h, w = draws.box.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    area, ratio = h * w / 64**2, w / h
    assert area.min() >= 0.3 and area.max() <= 1  # scale (0.35, 1), up to the rounding of the sides
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4 and ratio.min() < 0.8 and ratio.max() > 1.25
    # The same distribution as torchvision's own draws (its tries reject the large boxes that do not fit,
    # so the mean area is below (0.35 + 1) / 2): means within 0.02, about 3.5 standard errors.
    torch.manual_seed(0)
    crop, image = v2.RandomResizedCrop(64, scale=(0.35, 1.0)), torch.zeros(3, 64, 64)
    theirs = torch.tensor([[p["height"], p["width"]] for p in (crop.make_params([image]) for _ in range(2000))]).double()
    their_area, their_ratio = theirs[:, 0] * theirs[:, 1] / 64**2, theirs[:, 1] / theirs[:, 0]
    assert float(area.mean()) == pytest.approx(float(their_area.mean()), abs=0.02)
    assert float(ratio.log().mean()) == pytest.approx(float(their_ratio.log().mean()), abs=0.02)
    # Where no try fits (a 10 x 200 image: every side the area asks for is taller than 10), the centre
    # crop at ratio 4/3: height 10, width round(10 * 4/3) = 13, left (200 - 13) // 2.
    wide = draw_policy(5, torch.Generator().manual_seed(0), "trivial", (10, 200), crop_scale=0.9)
    assert wide.box.tolist() == [[0, 93, 10, 13]] * 5


def test_draws_are_fixed_by_the_generator_and_ops_do_not_depend_on_flip_or_crop():
    def draw(seed, **kw):
        return draw_policy(64, torch.Generator().manual_seed(seed), "randaugment", (32, 32), **kw)

    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a.op, b.op) and torch.equal(a.magnitude, b.magnitude) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.op, c.op)
    other = draw(3, hflip=0.0, crop_scale=0.5)
    assert torch.equal(a.op, other.op) and torch.equal(a.magnitude, other.magnitude) and not other.flip.any()


def test_a_rank_gets_its_share_of_the_global_batch():
    x = _photos(12)
    draws = draw_policy(len(x), torch.Generator().manual_seed(2), "trivial", (40, 56), crop_scale=0.5)
    whole = apply_policy(x, draws, MEAN, STD)
    for rank in range(3):
        rows = torch.arange(rank, len(x), 3)
        torch.testing.assert_close(apply_policy(x[rows], draws.select(rows), MEAN, STD), whole[rows], atol=0, rtol=0)


def _epoch_inputs(augment: str, crop: float, epoch: int) -> torch.Tensor:
    """The augmented batches train_one_epoch feeds the network for one epoch of 8 copies of one image
    (so the shuffle cannot tell epochs apart: only the augmentation can)."""
    torch.manual_seed(0)
    model = build_architecture("mobilenet_v3_small", 2)
    freeze_early_blocks(model, 0)
    split = DecodedSplit(classes=["a", "b"], paths=[f"{i}.png" for i in range(8)], labels=torch.tensor([0, 1] * 4),
                         images=_photos(1, 32, 32).expand(8, -1, -1, -1).contiguous(), img_size=32,
                         interpolation="bilinear")
    seen = []

    def trainable(h):
        seen.append(h.detach().clone())
        return model(h)

    pipeline = Pipeline(mean=MEAN, std=STD, device=torch.device("cpu"), channels_last=False, num_workers=0)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=0.0)
    train_one_epoch(model, 0, optimizer, split, 4, pipeline, torch.Generator().manual_seed(epoch_seed(7, epoch)),
                    progress=False, trainable=trainable, recipe=Recipe(augment=augment, random_resized_crop=crop))
    return torch.cat(seen)


@pytest.mark.parametrize("augment", ["trivial", "randaugment"])
def test_an_epoch_is_redrawn_the_same_and_differs_from_the_next(augment):
    first = _epoch_inputs(augment, 0.5, epoch=0)
    assert torch.equal(first, _epoch_inputs(augment, 0.5, epoch=0))  # a retried or resumed epoch
    assert not torch.equal(first, _epoch_inputs(augment, 0.5, epoch=1))
    assert len({tuple(image.flatten()[::97].tolist()) for image in first}) > 4  # each copy augmented its own way


@pytest.fixture(scope="module")
def seed_policy_loss(tmp_path_factory):
    """The first epoch's training loss of the run below with the seed's augmentation."""
    root = tmp_path_factory.mktemp("seed_run")
    cfg = load_config(None, {"model_name": "mobilenet_v3_small", "pretrained": False, "epochs": 1, "batch_size": 4,
                             "img_size": 48, "classes": None, "data_dir": str(write_image_folder(root / "data")),
                             "artifacts_dir": str(root / "artifacts"), "num_workers": 0})
    return train_epochs(cfg)[0].train_loss


@pytest.mark.parametrize("augment, crop", [("trivial", 0.35), ("randaugment", 0.0), ("seed", 0.35)])
def test_a_short_run_trains_with_each_policy(tmp_path, seed_policy_loss, augment, crop):
    cfg = load_config(None, {"model_name": "mobilenet_v3_small", "pretrained": False, "epochs": 1, "batch_size": 4,
                             "img_size": 48, "classes": None, "data_dir": str(write_image_folder(tmp_path / "data")),
                             "artifacts_dir": str(tmp_path / "artifacts"), "num_workers": 0,
                             "augment": augment, "random_resized_crop": crop})
    [metrics] = train_epochs(cfg)
    assert metrics.train_loss > 0 and 0 <= metrics.val_acc <= 1
    assert metrics.train_loss != seed_policy_loss  # the policy reached the training step


@pytest.mark.parametrize("key, value, message", [
    ("augment", "autoaugment", "augment must be seed, trivial or randaugment, got 'autoaugment'"),
    ("random_resized_crop", 1.0, "random_resized_crop must be a number from 0 to below 1 (0 turns it off), got 1.0"),
    ("random_resized_crop", -0.2, "random_resized_crop must be a number from 0 to below 1 (0 turns it off), got -0.2"),
])
def test_bad_policy_values_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, {key: value})
    assert message in str(error.value) and "\n" not in str(error.value)
