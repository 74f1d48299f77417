import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from course_utils import data


def test_manifest_verifies_every_file():
    assert data.verify_manifest() >= 3 + 2 + 10


def test_splits_have_expected_sizes_and_all_classes():
    sizes = {split: len(data.load_split(split)) for split in data.SPLITS}
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    assert sum(sizes.values()) == 1797
    test = data.load_split("test")
    assert test.images.shape == (360, 8, 8) and test.images.dtype == np.uint8
    assert test.images.max() <= 16
    assert set(np.bincount(test.labels)) <= set(range(34, 38))  # stratified: ~36 per class


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        data.load_split("holdout")


@pytest.fixture
def data_copy(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data.DATA_DIR, target)
    return target


def test_altered_file_fails_loudly(data_copy):
    path = data_copy / "digits" / "val.csv"
    path.write_text(path.read_text().replace("\n1,", "\n7,", 1))
    with pytest.raises(data.DataIntegrityError, match="changed or corrupted"):
        data.load_split("val", data_copy)


def test_missing_file_and_missing_manifest_fail_loudly(data_copy):
    (data_copy / "digits" / "test.csv").unlink()
    with pytest.raises(data.DataIntegrityError, match="missing"):
        data.load_split("test", data_copy)
    (data_copy / data.MANIFEST).unlink()
    with pytest.raises(data.DataIntegrityError, match="MANIFEST.sha256 is missing"):
        data.read_manifest(data_copy)
    with pytest.raises(data.DataIntegrityError, match="not listed"):
        (data_copy / data.MANIFEST).write_text("")
        data.verify_file("digits/train.csv", data_copy)


def test_split_tensors_are_normalised_with_training_statistics():
    x, y = data.split_tensors("train")
    assert x.shape == (1257, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def test_make_loader_shuffles_train_reproducibly_and_not_test():
    a = next(iter(data.make_loader("train", batch_size=16)))[1]
    b = next(iter(data.make_loader("train", batch_size=16)))[1]
    assert torch.equal(a, b)
    first_test = next(iter(data.make_loader("test", batch_size=16)))[1]
    assert torch.equal(first_test, torch.from_numpy(data.load_split("test").labels[:16]))


def test_digit_image_round_trips_through_the_transform():
    split = data.load_split("test")
    x, _ = data.split_tensors("test")
    transform = data.digits_transform()
    for i in range(20):
        image = data.digit_to_image(split.images[i])
        assert image.size == (64, 64) and image.mode == "L"
        torch.testing.assert_close(transform(image), x[i], atol=0.5 / 255 / data.DIGITS_STD + 1e-6, rtol=0)


def test_transform_accepts_every_common_mode():
    base = data.digit_to_image(data.load_split("test").images[0])
    expected = data.digits_transform()(base)
    variants = {
        "RGB": base.convert("RGB"),
        "RGBA": base.convert("RGBA"),
        "P": base.convert("P"),
        "CMYK": base.convert("RGB").convert("CMYK"),
        "I;16": Image.fromarray(np.asarray(base, dtype=np.uint16) * 257),
        "F": Image.fromarray(np.asarray(base, dtype=np.float32)),
        "1": base.convert("1", dither=Image.Dither.NONE),
    }
    for mode, image in variants.items():
        out = data.digits_transform()(image)
        assert out.shape == (1, 8, 8), mode
        tolerance = 3.0 if mode == "1" else 0.05  # 1-bit loses the grey levels
        assert (out - expected).abs().max() < tolerance, mode


def test_transparent_pixels_become_paper():
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    ink = data.digits_transform()(clear) * data.DIGITS_STD + data.DIGITS_MEAN
    assert ink.abs().max() < 1e-6  # no ink at all


def test_digit_to_image_rejects_wrong_shape():
    with pytest.raises(ValueError, match="8x8"):
        data.digit_to_image(np.zeros((28, 28)))


def test_samples_exist_and_carry_their_labels():
    samples = data.sample_images()
    assert {p.suffix for p in samples} == {".png", ".jpg"}
    assert sorted(data.label_of_sample(p) for p in samples if p.suffix == ".png") == list(range(10))
    with pytest.raises(ValueError, match="end with _<label>"):
        data.label_of_sample("cat.png")
