"""What a served image classifier expects: a small spec that travels with the model file.

A model file holds weights and a graph, not the preprocessing it was trained with. The spec
says the rest - input size and channels, how to resize and crop, the normalisation, the labels -
as a JSON *sidecar* next to the model (``resnet18.onnx`` -> ``resnet18.onnx.spec.json``).
:meth:`ModelSpec.for_model` reads it; a model without one is the course's digits CNN.

>>> spec = ModelSpec.imagenet(("cat", "dog")); spec.input_shape, spec.resize
((3, 224, 224), 256)

The ImageNet policy is torchvision's ``Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize``
and gives the same numbers (``tests/test_serving.py`` checks it against torchvision).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import data

if TYPE_CHECKING:
    import torch

SIDECAR_SUFFIX = ".spec.json"
INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
                  "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ModelSpecError(ValueError):
    """A spec that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ModelSpec:
    """Input and output conventions of an image classifier (defaults: the course's digits CNN)."""

    name: str = "digits"
    #: Height and width of the model's input.
    input_size: tuple[int, int] = (data.IMAGE_SIZE, data.IMAGE_SIZE)
    #: 1 (greyscale; transparency becomes white paper) or 3 (RGB).
    channels: int = 1
    #: Resize the *shorter* side to this, then centre-crop ``input_size``; ``None``: resize straight to it.
    resize: int | None = None
    interpolation: str = "box"
    #: Dark ink on light paper -> ink in [0, 1] (``1 - pixel``), as the digits scans.
    invert: bool = True
    mean: tuple[float, ...] = (data.DIGITS_MEAN,)
    std: tuple[float, ...] = (data.DIGITS_STD,)
    labels: tuple[str, ...] = data.CLASS_LABELS
    #: How many classes an answer has when the client does not say.
    top_k: int = 3
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def imagenet(cls, labels: Sequence[str], name: str = "imagenet", resize: int = 256, crop: int = 224) -> ModelSpec:
        """The chapter's ImageNet preprocessing: RGB, Resize(256), CenterCrop(224), ImageNet mean/std, top-5."""
        return cls(name=name, input_size=(crop, crop), channels=3, resize=resize, interpolation="bilinear",
                   invert=False, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, labels=tuple(labels),
                   top_k=min(5, len(labels)))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "spec") -> ModelSpec:
        """Build and validate a spec from parsed JSON; errors are one line naming ``source`` and the field."""
        if not isinstance(raw, dict):
            raise ModelSpecError(f"{source}: a spec is a JSON object, got {type(raw).__name__}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(raw) - known - {"format"})
        if unknown:
            raise ModelSpecError(f"{source}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in ("input_size", "mean", "std", "labels"):
                if not isinstance(value, list):
                    raise ModelSpecError(f"{source}: field {name!r} must be a list, got {value!r:.60}")
                value = tuple(value)
            values[name] = value
        try:
            return cls(**{k: v for k, v in values.items() if k != "format"})
        except ModelSpecError as error:
            raise ModelSpecError(f"{source}: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ModelSpecError(f"{path.name}: not valid JSON ({error.msg}, line {error.lineno})") from None
        return cls.from_dict(raw, source=path.name)

    @staticmethod
    def sidecar(model_path: str | Path) -> Path:
        """Where the spec of ``model_path`` lives: ``<model file name>.spec.json`` next to it."""
        model_path = Path(model_path)
        return model_path.with_name(model_path.name + SIDECAR_SUFFIX)

    @classmethod
    def for_model(cls, model_path: str | Path) -> ModelSpec:
        """The sidecar's spec if there is one, else the digits default."""
        sidecar = cls.sidecar(model_path)
        return cls.load(sidecar) if sidecar.is_file() else cls()

    def as_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw.pop("extra")
        return {"format": "course_utils.model_spec/1", **raw, "input_size": list(self.input_size),
                "mean": list(self.mean), "std": list(self.std), "labels": list(self.labels)}

    def save_next_to(self, model_path: str | Path) -> Path:
        """Write the sidecar of ``model_path``; returns its path."""
        target = self.sidecar(model_path)
        target.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return target

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ModelSpecError(f"field {name!r} {why}")

        if not isinstance(self.name, str) or not self.name:
            fail("name", "must be a non-empty string")
        if len(self.input_size) != 2 or not all(isinstance(v, int) and v > 0 for v in self.input_size):
            fail("input_size", f"must be [height, width], two positive integers; got {list(self.input_size)}")
        if self.channels not in (1, 3):
            fail("channels", f"must be 1 (greyscale) or 3 (RGB), got {self.channels!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < max(self.input_size)):
            fail("resize", f"must be null or an integer >= the input size {max(self.input_size)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            fail("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not isinstance(self.invert, bool):
            fail("invert", f"must be true or false, got {self.invert!r}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                fail(name, f"must have {self.channels} number(s), one per channel; got {list(values)}")
        if any(v <= 0 for v in self.std):
            fail("std", f"must be positive, got {list(self.std)}")
        if len(self.labels) < 2 or not all(isinstance(v, str) and v for v in self.labels):
            fail("labels", "must list at least two non-empty class names")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= len(self.labels):
            fail("top_k", f"must be an integer from 1 to {len(self.labels)} (the number of labels), got {self.top_k!r}")

    def check_outputs(self, classes: int, source: str = "the model") -> None:
        """The model must have one output per label."""
        if classes != len(self.labels):
            raise ModelSpecError(f"field 'labels' has {len(self.labels)} names but {source} has {classes} outputs")

    # ------------------------------------------------------------------ preprocessing
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one model input."""
        return (self.channels, *self.input_size)

    def blank_image(self) -> Image.Image:
        """A white image the model accepts (for warm-up)."""
        height, width = self.input_size
        return Image.new("L" if self.channels == 1 else "RGB", (width, height), "white")

    def preprocess_array(self, image: Image.Image) -> np.ndarray:
        """One decoded image -> ``float32 (channels, height, width)``, normalised (numpy: no torch needed)."""
        image = data.to_grey_on_white(image) if self.channels == 1 else _to_rgb(image)
        height, width = self.input_size
        method = INTERPOLATIONS[self.interpolation]
        if self.resize is None:
            image = image.resize((width, height), method)
        else:
            image = _resize_shorter_side(image, self.resize, method)
            image = _center_crop(image, height, width)
        pixels = np.asarray(image, dtype=np.uint8).reshape(height, width, self.channels)
        x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
        if self.invert:
            x = np.float32(1.0) - x
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The same as a torch tensor (what lessons and torch models use)."""
        import torch

        return torch.from_numpy(self.preprocess_array(image))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return data.to_grey_on_white(image).convert("RGB")
    return image.convert("RGB")


def _resize_shorter_side(image: Image.Image, size: int, method: Image.Resampling) -> Image.Image:
    """torchvision's ``Resize(size)``: the shorter side becomes ``size``, the longer keeps the aspect ratio."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new_size == image.size else image.resize(new_size, method)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's ``CenterCrop``: the same rounding of the offsets."""
    image_width, image_height = image.size
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def export_resnet18(path: str | Path, weights: str | Path | None = None, int8: bool = False) -> Path:
    """A torchvision ResNet-18 as ONNX plus its ImageNet spec sidecar: the chapter's model, served.

    ``weights``: a ``state_dict`` file of your own (loaded with ``weights_only=True``); default
    random weights (nothing is downloaded: the answers are then meaningless, the pipeline is real).
    ``int8``: also quantize (static QDQ), calibrated on the course's sample images.
    """
    import torch
    import torchvision

    from .. import export

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.resnet18(weights=None).eval()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    spec = ModelSpec.imagenet(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"], name="resnet18")
    fp32 = path.with_name(path.stem.removesuffix("_int8") + ".onnx") if int8 else path
    export.onnx_export(model, torch.zeros(2, *spec.input_shape), fp32)
    spec.save_next_to(fp32)
    if int8:
        samples = torch.stack([spec.preprocess(Image.open(p)) for p in data.sample_images()])
        export.quantize_onnx_static(fp32, path, samples, batch_size=8)
        spec.save_next_to(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m course_utils.serving.spec",
                                     description="Check a model spec, or export the chapter's ResNet-18 with one.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a .spec.json file")
    check.add_argument("spec")
    resnet = commands.add_parser("resnet18", help="export torchvision's ResNet-18 to ONNX with its ImageNet spec")
    resnet.add_argument("output", help="the .onnx file to write (the spec goes next to it)")
    resnet.add_argument("--weights", help="a state_dict file (default: random weights; nothing is downloaded)")
    resnet.add_argument("--int8", action="store_true", help="write a static int8 (QDQ) model instead")
    args = parser.parse_args(argv)
    if args.command == "check":
        try:
            spec = ModelSpec.load(args.spec)
        except (ModelSpecError, OSError) as error:
            parser.exit(2, f"error: {error}\n")
        print(f"{args.spec}: ok ({spec.name}: input {list(spec.input_shape)}, {len(spec.labels)} labels, top-{spec.top_k})")
        return 0
    written = export_resnet18(args.output, args.weights, args.int8)
    print(f"wrote {written} and {ModelSpec.sidecar(written).name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
