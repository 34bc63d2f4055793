"""The dataset on disk: layout and class checks, decoding any image mode, clear errors for bad files."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from harv_train.core.data import decode_image, decode_split, load_dataset, scan_dataset
from harv_train.errors import DataError
from tests.images import write_image_folder


def test_classes_come_from_the_folders_in_sorted_order(image_folder):
    splits = scan_dataset(image_folder)
    assert splits["train"].classes == ["cat", "dog"]
    assert splits["train"].counts() == {"cat": 8, "dog": 8}
    assert splits["val"].counts() == {"cat": 4, "dog": 4}


def test_given_classes_must_equal_the_folders(image_folder):
    assert scan_dataset(image_folder, ["dog", "cat"])["train"].classes == ["cat", "dog"]
    with pytest.raises(DataError, match=r"do not match the folders .*only in params: ProfA.*only in folders: cat"):
        scan_dataset(image_folder, ["ProfA", "dog"])


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"data_dir .*nope does not exist: put images in"):
        scan_dataset(tmp_path / "nope")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(image_folder, split):
    shutil.rmtree(image_folder / split)
    with pytest.raises(DataError, match=f"{split} does not exist: data_dir needs train/ and val/"):
        scan_dataset(image_folder)


def test_empty_split(image_folder):
    shutil.rmtree(image_folder / "val")
    (image_folder / "val").mkdir()
    with pytest.raises(DataError, match="val has no class folders"):
        scan_dataset(image_folder)


def test_class_folder_without_images(image_folder):
    for f in (image_folder / "train" / "dog").iterdir():
        f.unlink()
    (image_folder / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder .*train/dog has no images"):
        scan_dataset(image_folder)


def test_val_class_missing_from_train(image_folder):
    shutil.copytree(image_folder / "val" / "dog", image_folder / "val" / "bird")
    with pytest.raises(DataError, match="differ from .*only in val: bird"):
        scan_dataset(image_folder)


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "train" / "cat" / "cat_3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cannot read image .*cat_3.png .*set skip_bad_images: true"):
        load_dataset(image_folder, None, 32, "bilinear", 64)


def test_every_unreadable_image_is_counted_in_the_one_error(image_folder):
    for name in ("cat_1.png", "cat_2.png", "cat_3.png"):
        (image_folder / "train" / "cat" / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image .*cat_1.png .*\) and 2 more unreadable image\(s\) in "):
        load_dataset(image_folder, None, 32, "bilinear", 64)


def test_bad_images_can_be_skipped_and_are_reported(image_folder, caplog):
    (image_folder / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (image_folder / "val" / "dog" / "text.png").write_text("hello")
    with caplog.at_level(logging.INFO, logger="harv_train"):
        splits = load_dataset(image_folder, None, 32, "bilinear", 64, skip_bad_images=True)
    logged = caplog.messages
    assert len(splits["train"]) == 16 and len(splits["val"]) == 8
    assert [p.split("/")[-1] for p in splits["train"].skipped + splits["val"].skipped] == ["empty.jpg", "text.png"]
    assert [m.startswith("skipping unreadable image") and "skip_bad_images" not in m for m in logged] == [True, True]


def _palette_image(colour):
    img = Image.new("P", (50, 30), 1)
    img.putpalette([0, 0, 0, *colour] + [0] * (256 * 3 - 6))
    return img


@pytest.mark.parametrize(("make", "suffix", "rgb"), [
    (lambda: Image.new("L", (50, 30), 77), "png", (77, 77, 77)),
    (lambda: _palette_image((12, 34, 56)), "png", (12, 34, 56)),
    (lambda: _palette_image((12, 34, 56)), "gif", (12, 34, 56)),
    # Fully transparent: the colour under the alpha stays, no background is blended in (alpha dropped).
    (lambda: Image.new("RGBA", (50, 30), (10, 20, 30, 0)), "png", (10, 20, 30)),
    (lambda: Image.new("RGBA", (50, 30), (200, 100, 50, 128)), "png", (200, 100, 50)),
    (lambda: Image.new("LA", (50, 30), (90, 0)), "png", (90, 90, 90)),
    # CMYK: each channel (255 - ink) * (255 - black) / 255.
    (lambda: Image.new("CMYK", (50, 30), (255, 0, 0, 0)), "tiff", (0, 255, 255)),
    (lambda: Image.new("CMYK", (50, 30), (20, 40, 60, 10)), "tiff", (226, 207, 187)),
    (lambda: Image.new("CMYK", (50, 30), (0, 0, 0, 255)), "jpg", (0, 0, 0)),
], ids=["L", "P-png", "P-gif", "RGBA-transparent", "RGBA-half", "LA", "CMYK-cyan", "CMYK-mixed", "CMYK-jpeg-black"])
def test_any_image_mode_becomes_its_rgb_colour(tmp_path, make, suffix, rgb):
    path = tmp_path / f"x.{suffix}"
    make().save(path)
    tensor = decode_image(path, 32, "bilinear")
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8
    tolerance = 2 if suffix == "jpg" else 0
    for channel, value in zip(tensor, rgb):
        assert int(channel.min()) >= value - tolerance and int(channel.max()) <= value + tolerance, (tensor[:, 0, 0], rgb)


@pytest.mark.parametrize("suffix", ["png", "tiff"])
def test_a_16_bit_image_is_scaled_to_8_bits(tmp_path, suffix):
    """0..65535 maps onto 0..255 (value / 257), as 8-bit tools show a 16-bit image."""
    levels = np.array([0, 257, 128 * 257, 65535], dtype=np.uint16)
    Image.fromarray(np.repeat(levels, 8).reshape(4, 8).repeat(8, axis=0)).save(tmp_path / f"x.{suffix}")
    with Image.open(tmp_path / f"x.{suffix}") as img:
        assert img.mode == "I;16"
    tensor = decode_image(tmp_path / f"x.{suffix}", 32, "bilinear")
    assert tensor[:, ::8, 0].tolist() == [[0, 1, 128, 255]] * 3


def test_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (8000, 8000), (10, 200, 30)).save(path, quality=50)
    tensor = decode_image(path, 64, "bilinear")
    assert tensor.shape == (3, 64, 64)
    assert tensor[:, 32, 32].tolist() == pytest.approx([10, 200, 30], abs=3)


def test_streamed_batches_equal_cached_batches(image_folder):
    index = scan_dataset(image_folder)["train"]
    cached = decode_split(index, 32, "bilinear", cache_max_mb=64)
    streamed = decode_split(index, 32, "bilinear", cache_max_mb=0)
    assert cached.cached and not streamed.cached
    order = torch.randperm(len(cached), generator=torch.Generator().manual_seed(0))
    for (a, la), (b, lb) in zip(cached.batches(order, 5), streamed.batches(order, 5, num_workers=0)):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_unicode_spaces_and_symlinked_folders(tmp_path):
    real = write_image_folder(tmp_path / "real data", classes=("Prof Ä", "Room 1"))
    linked = tmp_path / "linked"
    for split in ("train", "val"):
        (linked / split).mkdir(parents=True)
        for name in ("Prof Ä", "Room 1"):
            (linked / split / name).symlink_to(real / split / name, target_is_directory=True)
    splits = load_dataset(linked, ["Prof Ä", "Room 1"], 32, "bilinear", 64)
    assert splits["train"].classes == ["Prof Ä", "Room 1"] and len(splits["train"]) == 16


def test_decoded_pixels_match_pil_resize(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(decode_image(tmp_path / "a.png", 32, "bicubic").permute(1, 2, 0).numpy(), expected)
