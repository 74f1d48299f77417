"""Model specs: any image classifier served with its own preprocessing and labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageFilter

from course_utils import data, models
from course_utils.serving import ModelLoadError, Predictor, serve_in_background
from course_utils.serving.spec import ModelSpec, ModelSpecError, export_resnet18, main

LABELS = tuple(f"class {i}" for i in range(1000))


def _photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").filter(ImageFilter.GaussianBlur(2))
    return image.convert(mode)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (256, 256), (300, 1000), (1234, 257), (224, 224), (100, 60)])
def test_imagenet_spec_matches_torchvision_transforms(size):
    from torchvision import transforms

    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    image = _photo(*size)
    ours = ModelSpec.imagenet(LABELS).preprocess(image)
    theirs = reference(image)
    assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_imagenet_spec_accepts_any_mode():
    spec = ModelSpec.imagenet(LABELS)
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        image = _photo(300, 200, "RGB").convert(mode if mode != "I;16" else "L")
        if mode == "I;16":
            image = Image.fromarray((np.asarray(image, dtype=np.uint16) * 257).astype("<u2"))
            assert image.mode == "I;16"
        assert spec.preprocess(image).shape == (3, 224, 224)


def test_the_default_spec_is_the_digits_transform_exactly():
    transform = data.digits_transform()
    for path in data.sample_images():
        image = Image.open(path)
        assert torch.equal(ModelSpec().preprocess(image), transform(image)), path.name


BAD_SPECS = {
    "mean": ({"channels": 3, "mean": [0.5], "std": [0.2, 0.2, 0.2], "invert": False, "labels": ["a", "b"]},
             "field 'mean' must have 3 number(s)"),
    "channels": ({"channels": 4}, "field 'channels' must be 1 (greyscale) or 3 (RGB)"),
    "input_size": ({"input_size": [224]}, "field 'input_size' must be [height, width]"),
    "resize": ({"input_size": [224, 224], "resize": 100}, "field 'resize' must be null or an integer >= the input"),
    "std": ({"std": [0]}, "field 'std' must be positive"),
    "labels": ({"labels": "cat"}, "field 'labels' must be a list"),
    "top_k": ({"top_k": 11}, "field 'top_k' must be an integer from 1 to 10"),
    "interpolation": ({"interpolation": "lanczos5"}, "field 'interpolation' must be one of"),
    "unknown": ({"nmae": "x"}, "unknown field 'nmae'"),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_a_bad_spec_is_one_line_naming_the_field(tmp_path, name):
    raw, message = BAD_SPECS[name]
    path = tmp_path / "model.onnx.spec.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelSpecError) as caught:
        ModelSpec.load(path)
    assert str(caught.value).startswith("model.onnx.spec.json: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_spec_round_trips_and_the_check_command(tmp_path, capsys):
    spec = ModelSpec.imagenet(LABELS, name="mine")
    written = spec.save_next_to(tmp_path / "mine.onnx")
    assert written.name == "mine.onnx.spec.json" and ModelSpec.for_model(tmp_path / "mine.onnx") == spec
    assert ModelSpec.for_model(tmp_path / "other.onnx") == ModelSpec()
    assert main(["check", str(written)]) == 0 and "1000 labels, top-5" in capsys.readouterr().out
    (tmp_path / "bad.spec.json").write_text("{\"channels\": 2,}")
    with pytest.raises(SystemExit):
        main(["check", str(tmp_path / "bad.spec.json")])
    assert "not valid JSON" in capsys.readouterr().err


def test_a_spec_whose_labels_do_not_fit_the_model_is_refused(tmp_path):
    model = tmp_path / "cnn.pth"
    model.write_bytes(models.checkpoint_path().read_bytes())
    ModelSpec(labels=("a", "b", "c")).save_next_to(model)
    with pytest.raises(ModelLoadError, match="its spec disagrees with it: field 'labels' has 3 names but the model has "
                                             "10 outputs"):
        Predictor.load(model, device="cpu")            # refused when loaded, before any request


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    return export_resnet18(tmp_path_factory.mktemp("resnet") / "resnet18.onnx")


def test_resnet18_onnx_agrees_with_torchvision_end_to_end(resnet18):
    import torchvision

    predictor = Predictor.load(resnet18, device="cpu")
    assert predictor.spec.name == "resnet18" and len(predictor.labels) == 1000 and predictor.spec.top_k == 5
    assert predictor.labels[:2] == ("tench", "goldfish")
    image = _photo(500, 375)
    x = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(image)   # torchvision's own preset
    torch.testing.assert_close(predictor.preprocess(image), x, atol=1e-6, rtol=0)
    answer = predictor.classify(io.BytesIO(_encode(image)).getvalue())
    assert len(answer) == 5 and answer[0].probability >= answer[-1].probability


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_the_service_serves_resnet18_with_top5(resnet18, framework):
    with serve_in_background(framework, args=["--model", str(resnet18), "--max-batch-size", "4"]) as server:
        upload = {"file": ("photo.png", _encode(_photo(640, 480)), "image/png")}
        answer = requests.post(server.url + "/predict", files=upload, timeout=30)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert len(predictions) == 5 and all(p["label"] for p in predictions)
        ready = requests.get(server.url + "/ready", timeout=5).json()
        assert (ready["model_spec"], ready["classes"], ready["model_kind"]) == ("resnet18", 1000, "onnx")
        metadata = requests.get(server.url + "/v2/models/resnet18", timeout=5).json()
        assert metadata["inputs"][0]["shape"] == [-1, 3, 224, 224]
        digits = requests.post(server.url + "/predict?top_k=1001", files=upload, timeout=30)
        assert digits.status_code == 422 and "1 to 1000" in digits.json()["error"]["message"]


def test_the_cli_refuses_a_bad_sidecar_in_one_line(tmp_path, capsys):
    from course_utils.serving.__main__ import parse_args

    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    ModelSpec.sidecar(model).write_text(json.dumps({"channels": 5}))
    with pytest.raises(SystemExit):
        parse_args(["--model", str(model)])
    assert "m.onnx.spec.json: field 'channels'" in capsys.readouterr().err
