"""The one typed, validated training configuration.

`load_config(path, overrides)` reads params.yaml, applies `--set KEY=VALUE` overrides (or a
`ParamOverrides` from the Prefect deployment form) and returns a frozen pydantic `TrainConfig`.
Every way a value can be wrong (unknown key, wrong type, out of range) becomes a one-line
`ConfigError` that names the key, what it must be and how to fix it. Each field carries its type,
bounds and description in one place; the "must be" wording of its error is derived from them
(`MustBe` where a type cannot say it). The keys are documented in docs/params.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, get_args, get_origin

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from harv_train.errors import ConfigError

# The seed's three backbones, then every torchvision classification model of a family that
# harv_train.core.models knows how to freeze and fine-tune (issue 14). Written out, not computed: the
# config loads without importing torch; tests/test_backbones.py checks it against torchvision's list.
ModelName = Literal[
    "mobilenet_v3_small", "efficientnet_b0", "efficientnet_lite0",
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m",
    "efficientnet_v2_s", "mobilenet_v2", "mobilenet_v3_large", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf",
    "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf",
    "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    "resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d",
    "resnext50_32x4d", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "wide_resnet101_2", "wide_resnet50_2",
]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float: PyYAML follows YAML 1.1, where a float needs a
    dot (`1.0e-4`), and would hand `lr: 1e-4` over as the string '1e-4'."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


SECTIONS = ("distributed",)  # params that are sections of keys (a mapping-valued param such as unfreeze is one value)


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested sections as dotted keys: {"distributed": {"nnodes": 1}} -> {"distributed.nnodes": 1}."""
    flat = {}
    for key, value in params.items():
        if key in SECTIONS and isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class MustBe:
    """The error wording of a field, next to it: `text` replaces what its type and bounds would say
    (a string's pattern reads badly in an error), `note` is added in parentheses."""

    text: str | None = None
    note: str | None = None


def _distinct(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct")
    return names


# strict (below) refuses True, 2.5 and "3" for an int, and bool for a float (an int is still taken);
# allow_inf_nan=False refuses NaN and inf.
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
# Non-space as Python's str.strip() sees it: it also strips the separators \x1c-\x1f.
NonEmptyStr = Annotated[str, Field(pattern=r"[^\s\x1c-\x1f]")]
ClassName = Annotated[str, Field(pattern=r"^[^/]*[^/\s\x1c-\x1f][^/]*$")]  # a folder name: not blank, no '/'
ClassList = Annotated[
    list[ClassName], Field(min_length=2, json_schema_extra={"uniqueItems": True}), AfterValidator(_distinct)
]


class DistributedConfig(BaseModel):
    """Data-parallel training under torchrun; nproc_per_node x nnodes = 1 is the plain single process."""

    model_config = _STRICT

    nproc_per_node: int = Field(
        1, ge=1, le=1024, description="Processes per machine; more than 1 runs each epoch under torchrun."
    )
    nnodes: int = Field(1, ge=1, le=1024, description="Machines taking part.")
    rdzv_endpoint: Annotated[str, MustBe("HOST:PORT")] = Field(
        "127.0.0.1:29400",
        pattern=r"^.+:[0-9]+$",
        description="HOST:PORT of the c10d rendezvous, used when nnodes > 1 (one node rendezvouses by itself).",
    )
    backend: Annotated[Literal["auto", "gloo", "nccl"], MustBe("auto, gloo or nccl")] = Field(
        "auto", description="Collective backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="Torchrun restarts of all workers of an epoch when one fails."
    )
    sync_batchnorm: Annotated[Literal["auto"] | bool, MustBe("auto, true or false")] = Field(
        "auto",
        description="Trainable BatchNorm layers normalize over the whole global batch, as one process would "
        "(SyncBatchNorm on CUDA, an all-reduce of the statistics on CPU); auto and true: with more than one "
        "process; false: each rank over its own share.",
    )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# `recipe: modern`: of the options tried, the combination that gained most on the held-out sets of
# real images within 1.5x the seed's epoch (benchmarks/bench_recipe.py; the figures, where it does
# not gain and what lost are in docs/recipes.md). Besides these keys it sets `unfreeze` from the
# run's length: `modern_unfreeze`.
MODERN_RECIPE: dict[str, Any] = {
    "lr": 0.003,
    "schedule": "cosine",
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
}
MODERN_KEYS = (*MODERN_RECIPE, "unfreeze")


# Shorter runs do not unfreeze: at 3 epochs, one unfrozen last epoch lost 1.4 points on the digits.
MODERN_UNFREEZE_MIN_EPOCHS = 6


def modern_unfreeze(epochs: int, freeze_ratio: float) -> dict[int, float]:
    """`recipe: modern`'s staged unfreezing: half of the frozen stages also train in the second half of
    a run of 6 epochs or more (from 1-based epoch ceil(epochs / 2) + 1); nothing with nothing frozen."""
    if epochs < MODERN_UNFREEZE_MIN_EPOCHS or not freeze_ratio > 0:
        return {}
    return {math.ceil(epochs / 2) + 1: round(freeze_ratio / 2, 6)}


class TrainConfig(BaseModel):
    """Every training parameter, validated; build it with `load_config` or `config_from_mapping`."""

    model_config = _STRICT

    # The seed's keys, with its defaults.
    model_name: Annotated[ModelName, MustBe("a torchvision classification model of the families in docs/params.md "
                                            "(resnet18, convnext_tiny, efficientnet_b0, ...) or efficientnet_lite0")] = Field(
        "mobilenet_v3_small",
        description="Backbone: a torchvision classification model (mobilenet_v3_small, resnet18, convnext_tiny, "
        "efficientnet_b0..b7, efficientnet_v2_s, regnet_y_400mf, densenet121, vgg16, ...; docs/params.md lists "
        "the families) or efficientnet_lite0.",
    )
    epochs: int = Field(3, ge=1, description="Number of training epochs.")
    batch_size: int = Field(
        16, ge=1, description="Training and validation batch size: the global batch, split across the processes."
    )
    lr: float = Field(0.0005, gt=0, description="Adam learning rate.")
    freeze_ratio: float = Field(
        0.7, ge=0, le=1, description="Fraction of the backbone's feature blocks to freeze (docs/params.md, Freezing)."
    )
    seed: int = Field(42, ge=0, description="Seeds the new head, shuffling, augmentation and dropout.")
    img_size: int = Field(224, ge=32, le=1024, description="Images are resized to img_size x img_size pixels.")
    classes: Annotated[ClassList | None, MustBe("null or a list of 2 or more distinct folder names")] = Field(
        None, description="Class names, which must equal the class folder names; null takes the folders."
    )
    # Where things live.
    data_dir: Annotated[NonEmptyStr, MustBe("a directory path")] = Field(
        "data/processed", description="Directory holding train/<class>/ and val/<class>/."
    )
    artifacts_dir: Annotated[NonEmptyStr, MustBe("a directory path")] = Field(
        "artifacts",
        description="Directory of the run's outputs (checkpoints/, eval/, export/); one run at a time (a lock).",
    )
    # Weights.
    pretrained: bool = Field(True, description="Start from ImageNet weights.")
    weights_path: Annotated[NonEmptyStr | None, MustBe("null or a file path")] = Field(
        None, description="A local ImageNet state dict for model_name, instead of torchvision's cache."
    )
    # Optimisation.
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay, on trainable parameters only.")
    early_stopping_patience: Annotated[int, MustBe(note="0 turns early stopping off")] = Field(
        5,
        ge=0,
        description="Stop after this many epochs without a better model (higher val accuracy, or equal with "
        "lower val loss); 0 never stops.",
    )
    lr_factor: float = Field(
        0.5, gt=0, lt=1, description="ReduceLROnPlateau (on val loss) multiplies the learning rate by this."
    )
    lr_patience: int = Field(
        3, ge=0, description="Epochs without a lower val loss before ReduceLROnPlateau lowers the learning rate."
    )
    min_lr: float = Field(1e-7, ge=0, description="ReduceLROnPlateau never lowers the learning rate below this.")
    # Orchestration and hardware.
    epoch_retries: int = Field(
        2, ge=0, le=100, description="Prefect retries of a failed epoch task; each restarts the epoch from last.pth."
    )
    # A Prefect API outage (issue 18): how long the end of a run waits for the API to come back.
    prefect_outage_wait_s: int = Field(
        30, ge=0, le=3600,
        description="When the Prefect API went away during the run and is still away at its end, wait up to "
        "this many seconds for it, so that the flow run's final state reaches it (training never waits).",
    )
    device: Annotated[str, MustBe("auto, cpu, cuda or cuda:N")] = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$",
        description="Torch device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    )
    num_workers: int = Field(
        2, ge=0, description="Processes that decode images into the decoded-image cache (0: the run's own process)."
    )
    threads: Annotated[int, MustBe(note="0 uses every available core")] = Field(
        0, ge=0, description="Torch compute threads; 0 uses every core the process may run on."
    )
    channels_last: bool = Field(True, description="NHWC memory layout (1.3-1.6x faster convolutions on CPU).")
    cache_max_mb: Annotated[int, MustBe(note="0 always reads from the disk cache")] = Field(
        2048,
        ge=0,
        description="A split whose decoded images take up to this many MiB is held in memory; a larger one is "
        "read from the disk cache batch by batch.",
    )
    cache_dir: Annotated[NonEmptyStr | None, MustBe("null or a directory path")] = Field(
        None,
        description="Folder of the decoded-image cache and of torch.compile's kernels; null: $HARV_TRAIN_CACHE_DIR, "
        "else $XDG_CACHE_HOME/harv-train, else ~/.cache/harv-train.",
    )
    skip_bad_images: bool = Field(
        False, description="Log and skip unreadable images (counted in MLflow) instead of stopping."
    )
    compile: bool = Field(
        False,
        description="torch.compile the trainable part of the network (kernels cached in cache_dir); on 2 CPU "
        "cores it gained nothing measurable for mobilenet_v3_small (docs/data-at-scale.md).",
    )
    export: bool = Field(
        True,
        description="After training, export the best model to TorchScript and ONNX (ARTIFACTS_DIR/export/); "
        "the evaluation report is always written.",
    )
    # Recipe options (issue 14): the defaults are the seed's recipe (tests/test_seed_recipe.py pins it).
    recipe: Annotated[Literal["seed", "modern"], MustBe("seed or modern")] = Field(
        "seed",
        description="A preset of the recipe keys: seed (the defaults below) or modern (schedule cosine, warmup_epochs "
        "1, lr 0.003, label_smoothing 0.1, and unfreeze: half of the frozen stages train in the second half of a "
        "run of 6+ epochs; docs/recipes.md); a key set explicitly overrides the preset.",
    )
    hflip: float = Field(
        0.5, ge=0, le=1,
        description="Probability of a horizontal flip per training image; 0 never flips (for images whose "
        "meaning a mirror changes: text, left/right).",
    )
    augment: Annotated[Literal["seed", "trivial", "randaugment"], MustBe("seed, trivial or randaugment")] = Field(
        "seed",
        description="Training augmentation after the flip: seed (rotation 10 degrees, colour jitter 0.2), trivial "
        "(torchvision's TrivialAugmentWide: one op per image) or randaugment (RandAugment: 2 ops, magnitude 9 of 31).",
    )
    random_resized_crop: Annotated[float, MustBe(note="0 turns it off")] = Field(
        0.0, ge=0, lt=1,
        description="RandomResizedCrop before the augmentation: a crop of scale (s, 1) of the image, ratio 3/4 to 4/3, "
        "resized back to img_size (bilinear); 0: off.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="Label smoothing of the training loss (0: none); val loss stays the plain NLL.",
    )
    backbone_lr_mult: float = Field(
        1.0, gt=0, le=1,
        description="Learning rate of the trainable backbone stages as a fraction of lr (the head keeps lr); "
        "fixed for a run (resume keeps its groups).",
    )
    schedule: Annotated[Literal["plateau", "cosine"], MustBe("plateau or cosine")] = Field(
        "plateau",
        description="plateau: ReduceLROnPlateau on val loss (lr_factor, lr_patience, min_lr); cosine: warmup_epochs "
        "of linear warmup, then cosine decay over the remaining epochs.",
    )
    warmup_epochs: int = Field(
        0, ge=0, description="Epochs of linear lr warmup before the cosine decay (schedule: cosine only).",
    )
    unfreeze: Annotated[dict[Annotated[int, Field(strict=False)], float],
                        MustBe("a mapping of epoch to freeze_ratio such as {3: 0.3}")] = Field(
        default_factory=dict,
        description="Staged unfreezing: {EPOCH: RATIO} trains from epoch EPOCH (1-based, >= 2) on with only RATIO "
        "of the blocks frozen (the newly trainable blocks at lr x backbone_lr_mult); ratios below freeze_ratio and "
        "falling as the epochs grow; {} keeps freeze_ratio for the whole run.",
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="Keep an exponential moving average of the trainable weights, updated every step with this "
        "decay (warmed up as (1 + n) / (10 + n)); validation, best_model.pth and the exports use the average. "
        "0: off.",
    )
    # Calibration (issue 14).
    calibrate: bool = Field(
        True,
        description="After training, fit a temperature on the val logits of the best model (LBFGS on NLL) and "
        "apply it in predict, the export and the MLflow model; false keeps the raw softmax.",
    )
    # Tracking.
    mlflow_tracking_uri: Annotated[NonEmptyStr, MustBe("a tracking URI such as sqlite:///mlflow.db")] = Field(
        "sqlite:///mlflow.db", description="Any MLflow tracking URI: a SQLite file or http://host:port."
    )
    mlflow_experiment: Annotated[NonEmptyStr, MustBe("an experiment name")] = Field(
        "harv-train", description="MLflow experiment name."
    )
    registered_model_name: Annotated[NonEmptyStr | None, MustBe("null or a model name")] = Field(
        None,
        description="Register the best model under this name (alias champion moves to it only when its val "
        "accuracy is higher); null does not register.",
    )
    # Splits made for you (docs/data.md, Splits made for you).
    val_fraction: Annotated[float | None, MustBe("null or a number between 0 and 1 (exclusive)")] = Field(
        None,
        gt=0,
        lt=1,
        description="Split data_dir's class folders for you: this fraction of each class goes to val (stratified, "
        "by a stable hash of each file's path and seed); null: data_dir holds train/ and val/.",
    )
    test_fraction: Annotated[float | None, MustBe("null or a number between 0 and 1 (exclusive)")] = Field(
        None,
        gt=0,
        lt=1,
        description="With val_fraction: this fraction of each class goes to a test split, evaluated after "
        "training and never used to choose a model; null: no test split made.",
    )
    # Class imbalance and model selection (docs/data.md, Class imbalance).
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="Training loss weights: none, or balanced (inverse class frequency of the train split)."
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle",
        description="Epoch order: shuffle (each image once), or balanced (each class drawn equally often, with "
        "replacement, seeded per epoch).",
    )
    select_metric: Literal["val_acc", "val_macro_f1"] = Field(
        "val_acc",
        description="What picks the best epoch, drives early stopping and is compared for the champion: val "
        "accuracy or val macro F1 (ties broken by val loss).",
    )
    # Beyond one process.
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Data-parallel training under torchrun; nproc_per_node x nnodes = 1 is the plain single process.",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_preset(cls, raw: Any) -> Any:
        """`recipe: modern` fills in the recipe keys the params do not set."""
        if isinstance(raw, Mapping) and raw.get("recipe") == "modern":
            preset = dict(MODERN_RECIPE)
            if "unfreeze" not in raw:
                try:
                    epochs = int(raw.get("epochs", cls.model_fields["epochs"].default))
                    ratio = float(raw.get("freeze_ratio", cls.model_fields["freeze_ratio"].default))
                    preset["unfreeze"] = modern_unfreeze(epochs, ratio)
                except (TypeError, ValueError):
                    pass  # an invalid epochs or freeze_ratio gets its own error from its field
            return {**preset, **raw}
        return raw

    @model_validator(mode="after")
    def _warmup_needs_cosine(self) -> TrainConfig:
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError(f"warmup_epochs {self.warmup_epochs} needs schedule: cosine (the plateau schedule "
                             "has no warmup): set schedule: cosine or warmup_epochs: 0")
        return self

    @model_validator(mode="after")
    def _unfreeze_only_unfreezes(self) -> TrainConfig:
        ratio = self.freeze_ratio
        for epoch, later in sorted(self.unfreeze.items()):
            if epoch < 2 or not 0 <= later < ratio:
                raise ValueError(
                    f"unfreeze {{{epoch}: {later}}}: each entry must be an epoch >= 2 and a freeze_ratio from 0 to "
                    f"below the one before it ({ratio}), e.g. unfreeze: {{3: {ratio / 2:g}}}")
            ratio = later
        return self

    def frozen_ratio_at(self, epoch: int) -> float:
        """The freeze_ratio that 0-based `epoch` trains with (unfreeze's entries up to it, else freeze_ratio)."""
        started = [e for e in self.unfreeze if e <= epoch + 1]
        return self.unfreeze[max(started)] if started else self.freeze_ratio

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainConfig:
        world = self.distributed.world_size
        if self.batch_size % world:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by the {world} processes of distributed "
                "(nproc_per_node x nnodes): it is the global batch, split evenly across them"
            )
        return self

    @model_validator(mode="after")
    def _fractions_fit(self) -> TrainConfig:
        if self.test_fraction is not None and self.val_fraction is None:
            raise ValueError("test_fraction needs val_fraction: set val_fraction too (data_dir then holds class "
                             "folders), or put a test/ folder beside train/ and val/")
        total = (self.val_fraction or 0) + (self.test_fraction or 0)
        if total >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {total:g}): leave some images "
                             "to train on")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values (distributed as a dict), safe for JSON, YAML and checkpoints."""
        return self.model_dump()

    def flat_dict(self) -> dict[str, Any]:
        """Nested sections as dotted keys (`distributed.nproc_per_node`): MLflow params are flat."""
        return flatten(self.to_dict())

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.artifacts_dir) / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        """The evaluation report of best_model.pth (harv_train/reporting/post_training.py)."""
        return Path(self.artifacts_dir) / "eval"

    @property
    def test_eval_dir(self) -> Path:
        """The report of best_model.pth on the test split, when there is one (never used to choose)."""
        return Path(self.artifacts_dir) / "test"

    @property
    def splits_dir(self) -> Path:
        """The file list of each split as trained (`<split>.csv`), logged to MLflow under splits/."""
        return Path(self.artifacts_dir) / "splits"

    @property
    def export_dir(self) -> Path:
        """TorchScript and ONNX files of best_model.pth (harv_train/reporting/post_training.py)."""
        return Path(self.artifacts_dir) / "export"


VALID_KEYS = tuple(TrainConfig.model_fields)
_DISTRIBUTED_KEYS = tuple(DistributedConfig.model_fields)


_RANGE_WORDING = {
    (): "",
    ("ge",): " >= {ge}",
    ("gt",): " > {gt}",
    ("ge", "le"): " from {ge} to {le}",
    ("gt", "lt"): " between {gt} and {lt} (exclusive)",
    ("ge", "lt"): " from {ge} to below {lt}",
    ("gt", "le"): " > {gt} and <= {le}",
}


def _number_range(info: FieldInfo) -> str:
    bounds = {}
    for m in info.metadata:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt)):
            name = type(m).__name__.lower()  # Ge(ge=1) -> "ge"
            bounds[name] = getattr(m, name)
    form = _RANGE_WORDING.get(tuple(sorted(bounds)))
    if form is not None:
        return form.format(**bounds)
    raise TypeError(f"no wording for the bounds {bounds}: give the field a MustBe")


def _must_be(key: str, info: FieldInfo) -> str:
    """What a value of this field must be, for "KEY must be ..., got VALUE"."""
    say = next((m for m in info.metadata if isinstance(m, MustBe)), MustBe())
    kind = info.annotation
    if say.text:
        text = say.text
    elif kind is bool:
        text = "true or false"
    elif kind is int:
        text = "an integer" + _number_range(info)
    elif kind is float:
        text = "a number" + _number_range(info)
    elif get_origin(kind) is Literal:
        text = "one of " + ", ".join(get_args(kind))
    elif isinstance(kind, type) and issubclass(kind, BaseModel):
        text = "a mapping with keys " + ", ".join(kind.model_fields)
    else:
        raise TypeError(f"{key}: no wording for {kind}: give the field a MustBe")
    return f"{text} ({say.note})" if say.note else text


# Derived from the fields at import: a field without a wording fails here, not in a user's run.
_WORDING = {key: _must_be(key, info) for key, info in TrainConfig.model_fields.items()} | {
    f"distributed.{key}": _must_be(key, info) for key, info in DistributedConfig.model_fields.items()
}


def _optional_fields(model: type[BaseModel], swap: dict[type, type]) -> dict[str, Any]:
    """Every field of `model` as `T | None = None`, with its bounds, pattern and description."""
    fields = {}
    for key, info in model.model_fields.items():
        kind = swap.get(info.annotation, info.annotation)
        if info.metadata:
            kind = Annotated[(kind, *info.metadata)]
        fields[key] = (Optional[kind], Field(None, description=info.description))
    return fields


_OVERRIDES = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
DistributedOverrides = create_model(
    "DistributedOverrides",
    __config__=_OVERRIDES,
    __doc__="Keys of distributed to override; a key left empty (None) keeps params_file's value.",
    __module__=__name__,
    **_optional_fields(DistributedConfig, {}),
)
# For the Prefect deployment form: None means "take the value from params_file". So the form cannot
# set classes (or weights_path, registered_model_name) to null: that is done in params.yaml or with
# --set classes=null, whose plain-mapping path keeps an explicit None.
ParamOverrides = create_model(
    "ParamOverrides",
    __config__=_OVERRIDES,
    __doc__="Params to override for one run; a key left empty (None) keeps params_file's value.",
    __module__=__name__,
    **_optional_fields(TrainConfig, {DistributedConfig: DistributedOverrides}),
)


def overrides_mapping(overrides: ParamOverrides | Mapping[str, Any] | None) -> dict[str, Any]:
    """What load_config applies: a mapping as given (an explicit None stays), or the keys set in a
    ParamOverrides (not None), distributed as a nested dict."""
    if overrides is None:
        return {}
    if isinstance(overrides, ParamOverrides):
        values = overrides.model_dump(exclude_none=True)
        if values.get("distributed") == {}:
            del values["distributed"]
        return values
    if isinstance(overrides, Mapping):
        return dict(overrides)
    raise ConfigError(
        f"overrides must be a mapping of params or a ParamOverrides, got {type(overrides).__name__}"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown(keys: Any, known: tuple[str, ...]) -> list[str]:
    return sorted(repr(k) for k in keys if k not in known)  # repr: a key may hold a newline


def _explain(exc: ValidationError, raw: Mapping[str, Any], source: str) -> ConfigError:
    """One problem of a ValidationError, the first as the file reads: top-level keys in the mapping's
    order, then distributed (unknown keys, then values), then the cross-field rule."""
    errors = exc.errors()
    section = raw.get("distributed")
    in_section = [e for e in errors if len(e["loc"]) > 1 and e["loc"][0] == "distributed"]
    top = [e for e in errors if e["loc"] and e not in in_section]
    if top:
        key = min((e["loc"][0] for e in top), key=list(raw).index)
        return ConfigError(f"{source}: {key} must be {_WORDING[key]}, got {_short(raw[key])}")
    if in_section:
        unknown = _unknown(section, _DISTRIBUTED_KEYS)
        if unknown:
            return ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)} in distributed; valid keys are: "
                + ", ".join(_DISTRIBUTED_KEYS)
            )
        key = min((e["loc"][1] for e in in_section), key=list(section).index)
        return ConfigError(
            f"{source}: distributed.{key} must be {_WORDING[f'distributed.{key}']}, got {_short(section[key])}"
        )
    error = errors[0]  # a model validator's ValueError: its text is the message
    return ConfigError(f"{source}: {error.get('ctx', {}).get('error', error['msg'])}")


def config_from_mapping(raw: Mapping[str, Any], source: str = "params") -> TrainConfig:
    """Validate a mapping of params into a TrainConfig; `source` names it in error messages."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source} must be a mapping of `key: value` lines, got {type(raw).__name__}: "
            "see params.yaml in the repository for the format"
        )
    unknown = _unknown(raw, VALID_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(VALID_KEYS)}"
        )
    values = dict(raw)
    if isinstance(values.get("distributed"), Mapping):
        values["distributed"] = dict(values["distributed"])
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        raise _explain(exc, values, source) from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file into a dict (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} not found: pass --params PATH to an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read params file {path} ({exc}): check its permissions and encoding") from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} must be a mapping of `key: value` lines, got a YAML {type(raw).__name__}: "
            "see params.yaml in the repository for the format"
        )
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one `--set KEY=VALUE`; VALUE is YAML, so `epochs=5` is an int and `classes=[a, b]` a list."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE: write it like --set epochs=5")
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML: quote it, e.g. --set {key}='...'") from None
    return key, value


def _is_section_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("distributed.") and len(key) > len("distributed.")


def load_config(
    params_path: str | Path | None = "params.yaml",
    overrides: ParamOverrides | Mapping[str, Any] | None = None,
) -> TrainConfig:
    """params.yaml (optional) + overrides -> validated TrainConfig.

    `overrides` is a mapping (`--set` values, `distributed.KEY` for one key of the section) or a
    ParamOverrides; a `distributed` mapping is merged into the file's section key by key."""
    raw: dict[str, Any] = {} if params_path is None else read_params_file(params_path)
    source = "params" if params_path is None else str(params_path)
    overrides = overrides_mapping(overrides)
    if overrides:
        bad = sorted(repr(k) for k in overrides if k not in VALID_KEYS and not _is_section_key(k))
        if bad:
            raise ConfigError(
                f"--set: unknown key(s) {', '.join(bad)}; valid keys are: {', '.join(VALID_KEYS)}"
                + " (and distributed.KEY)"
            )
        for key, value in overrides.items():
            if _is_section_key(key):  # distributed.nproc_per_node=2 sets one key of the section
                key, _, sub = key.partition(".")
                value = {sub: value}
            if key == "distributed" and isinstance(value, Mapping):
                current = raw.get(key)
                raw[key] = {**(current if isinstance(current, Mapping) else {}), **value}
            else:
                raw[key] = value
        source += " with --set overrides"
    return config_from_mapping(raw, source)


def write_params_file(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved params as YAML, so a run's params.yaml can be logged and reused with --params."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


__all__ = [
    "MODEL_NAMES",
    "DistributedConfig",
    "DistributedOverrides",
    "MustBe",
    "ParamOverrides",
    "TrainConfig",
    "VALID_KEYS",
    "config_from_mapping",
    "flatten",
    "load_config",
    "overrides_mapping",
    "parse_override",
    "read_params_file",
    "write_params_file",
]
