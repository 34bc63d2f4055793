"""Splits made for you from a folder of class folders: stratified, stable, logged, bad input in one line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from harv_train.config import load_config
from harv_train.core.data import load_dataset, scan_dataset
from harv_train.core.session import TrainingSession
from harv_train.core.splits import assign_class
from harv_train.errors import ConfigError, DataError
from tests.images import write_image_folder

REPO = Path(__file__).resolve().parent.parent


def _flat(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / name / f"{name}_{i:03d}.png")
    return root


def _names(indexes) -> dict[str, list[str]]:
    return {split: [p.name for p, _ in index.samples] for split, index in indexes.items()}


def test_made_splits_are_stratified_and_the_same_for_the_same_files_and_seed(tmp_path):
    root = _flat(tmp_path / "data", {"cat": 20, "dog": 8})
    first = scan_dataset(root, None, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert {s: index.counts() for s, index in first.items()} == {
        "train": {"cat": 10, "dog": 4}, "val": {"cat": 5, "dog": 2}, "test": {"cat": 5, "dog": 2}}
    assert _names(scan_dataset(root, None, val_fraction=0.25, test_fraction=0.25, seed=3)) == _names(first)
    assert _names(scan_dataset(root, None, val_fraction=0.25, test_fraction=0.25, seed=4)) != _names(first)
    every = sorted(n for names in _names(first).values() for n in names)
    assert every == sorted(p.name for p in root.rglob("*.png"))  # each image in exactly one split


def test_adding_images_keeps_the_existing_ones_in_their_split():
    old = [f"cat/{i:04d}.jpg" for i in range(200)]
    new = old + [f"cat/new_{i:04d}.jpg" for i in range(10)]
    before = dict(zip(old, assign_class(old, 42, 0.2, 0.1)))
    after = dict(zip(new, assign_class(new, 42, 0.2, 0.1)))
    moved = [p for p in old if before[p] != after[p]]
    # 10 new images move at most 10 existing ones across each of the two boundaries.
    assert len(moved) <= 20
    assert len(moved) < 0.1 * len(old)


@pytest.mark.parametrize("fractions, needed", [((0.25, None), 2), ((0.25, 0.25), 3)])
def test_a_class_too_small_for_every_split_is_one_line_naming_it_and_its_count(tmp_path, fractions, needed):
    root = _flat(tmp_path / "data", {"cat": 10, "dog": needed - 1})
    with pytest.raises(DataError) as caught:
        scan_dataset(root, None, *fractions)
    message = str(caught.value)
    assert "\n" not in message
    assert f"class dog has {needed - 1} image(s)" in message and f"need at least {needed}" in message


@pytest.mark.parametrize("key, value", [("val_fraction", 0), ("val_fraction", 1), ("val_fraction", 1.5),
                                        ("test_fraction", -0.1)])
def test_a_fraction_outside_0_1_is_one_line(key, value):
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"val_fraction": 0.2, key: value})
    assert "\n" not in str(caught.value)
    assert f"{key} must be null or a number between 0 and 1 (exclusive), got {value}" in str(caught.value)


def test_a_test_folder_beside_train_and_val_is_a_third_split(image_folder):
    shutil.copytree(image_folder / "val", image_folder / "test")
    splits = load_dataset(image_folder, None, 32, "bilinear", 64)
    assert list(splits) == ["train", "val", "test"]
    assert len(splits["test"]) == 8 and all("/test/" in str(p) for p in splits["test"].paths)


@pytest.mark.usefixtures("prefect_server")
def test_a_flat_folder_with_val_fraction_trains_and_logs_its_split_files_dataset_and_source(make_config, tmp_path):
    from flows.train_flow import train_flow
    from harv_train.config import write_params_file

    made = write_image_folder(tmp_path / "made", n_train=8, n_val=0)
    flat = made / "train"  # cat/ and dog/, 8 images each, directly
    cfg = make_config(epochs=1, data_dir=str(flat), val_fraction=0.25)
    params = tmp_path / "params.yaml"
    write_params_file(cfg, params)
    state = train_flow(params_file=str(params), return_state=True)
    assert state.is_completed(), state.message

    client = MlflowClient(cfg.mlflow_tracking_uri)
    run = client.get_run(state.result().mlflow_run_id)
    assert (run.data.metrics["train_images"], run.data.metrics["val_images"]) == (12, 4)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "splits")} == {"splits/train.csv", "splits/val.csv"}
    logged = Path(client.download_artifacts(run.info.run_id, "splits/val.csv", str(tmp_path / "down")))
    rows = list(csv.DictReader(logged.open()))
    expected = scan_dataset(flat, None, val_fraction=0.25, seed=cfg.seed)["val"]
    assert [(r["path"], r["class"]) for r in rows] == [
        (p.relative_to(flat).as_posix(), expected.classes[label]) for p, label in expected.samples]
    # Lineage: the dataset input (the runs table's Dataset column), the code's commit, the experiment's kind.
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, len(dataset.digest)) == ("train", 16)
    assert json.loads(dataset.profile)["splits"] == {"train": 12, "val": 4}
    assert dataset.digest == TrainingSession(cfg).dataset_info().digest
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["harv_train.git_dirty"] in ("true", "false")
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
