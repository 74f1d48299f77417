"""One predictor interface over every model format the course produces.

``Predictor.load(path)`` recognises the file:

* ``.onnx`` - ONNX Runtime (CUDA provider first on a GPU, checked);
* ``.pt2`` - a ``torch.export`` program, or an AOTInductor package;
* ``.pt`` / ``.pth`` - a TorchScript archive, or a ``state_dict`` of the course's DigitsCNN
  (loaded with ``weights_only=True``; never a pickled module).

and reads the model's :class:`~.spec.ModelSpec` (preprocessing, labels) from the sidecar next to
the file; without one, the model is the course's digits CNN.

Whatever the format, a request goes through the same four stages, named as the field names them
(TorchServe, KServe, LitServe): **decode** (bytes -> image), **preprocess** (image -> tensor),
**predict** (batch -> class probabilities, under ``torch.inference_mode``) and **encode**
(probabilities -> top-k answer). :meth:`Predictor.classify` runs all four; a server that batches
requests calls them one by one, with its batcher between preprocess and predict.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .. import data, env, export, models
from .images import DEFAULT_MAX_PIXELS, decode_image
from .spec import ModelSpec


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    index: int
    label: str
    probability: float

    def as_json(self) -> dict[str, object]:
        return {"class": self.index, "label": self.label, "probability": round(self.probability, 6)}


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/code/__torch__.py") or name.endswith("constants.pkl")
                       for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _is_aoti_package(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


class Predictor:
    """A loaded, warmed-up model plus its preprocessing and labels (its :class:`~.spec.ModelSpec`).

    >>> p = Predictor.load()          # the committed checkpoint
    >>> p.kind, len(p.labels), p.spec.input_shape
    ('eager', 10, (1, 8, 8))
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], kind: str, version: str,
                 device: torch.device, spec: ModelSpec | None = None, dtype: torch.dtype = torch.float32) -> None:
        self._fn = fn
        self.kind = kind
        self.version = version
        self.device = device
        self.dtype = dtype
        self.spec = spec or ModelSpec()
        self.ready = False

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device | None = None,
             version: str | None = None, spec: ModelSpec | None = None) -> Predictor:
        """Load a model file (default: the course's trained checkpoint) and return a predictor.

        ``spec`` defaults to the sidecar next to the file (``<file>.spec.json``), else the digits spec.
        """
        device = torch.device(device) if device is not None else env.pick_device()
        path = models.checkpoint_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        spec = spec or ModelSpec.for_model(path)
        digest = data.sha256_file(path)[:12]
        version = version or f"{path.stem}-{digest}"
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            session = export.ort_session(path, providers=export.ort_providers(device))
            runner = export.OrtRunner(session)
            return cls(runner, "onnx", version, torch.device("cpu"), spec)
        if suffix == ".pt2":
            if _is_aoti_package(path):
                compiled = torch._inductor.aoti_load_package(str(path))
                return cls(compiled, "aotinductor", version, torch.device("cpu"), spec)
            program = torch.export.load(str(path))
            return cls(program.module().to(device), "exported", version, device, spec)
        if suffix in (".pt", ".pth"):
            if _is_torchscript(path):
                scripted = torch.jit.load(str(path), map_location=device).eval()
                return cls(scripted, "torchscript", version, device, spec)
            model = models.load_trained_cnn(device=device, path=path)
            return cls(model, "eager", version, device, spec)
        raise ValueError(f"unknown model format {suffix!r}: use .pt/.pth (state_dict or TorchScript), "
                         ".pt2 (torch.export or AOTInductor) or .onnx")

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> float:
        """Run a few dummy batches (first calls pay for lazy initialisation); return seconds taken.

        Also checks that the model has one output per label of its spec.
        """
        start = time.perf_counter()
        one = self.preprocess(self.spec.blank_image())
        for size in batch_sizes:
            probabilities = self.predict(one.unsqueeze(0).expand(size, *one.shape).contiguous())
        self.spec.check_outputs(probabilities.shape[1], f"model {self.version}")
        self.ready = True
        return time.perf_counter() - start

    # ------------------------------------------------------------------ the four stages
    def decode(self, raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Upload bytes -> image, or a :class:`~.contract.ServingError` (400/413/415) saying why."""
        return decode_image(raw, max_pixels)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> one model input (no batch dimension), as the spec says."""
        return self.spec.preprocess(image)

    def check_batch(self, batch: object) -> torch.Tensor:
        """A float tensor ``(N, *spec.input_shape)`` (one input may omit N) with finite values, or a ValueError."""
        x = torch.as_tensor(batch)
        shape = self.spec.input_shape
        if x.dim() == len(shape):
            x = x.unsqueeze(0)  # one input -> a batch of one
        if tuple(x.shape[1:]) != shape or x.shape[0] < 1:
            wanted = ", ".join(map(str, shape))
            raise ValueError(f"expected a batch (N, {wanted}) or one ({wanted}) input, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point inputs, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("inputs contain NaN or infinity")
        return x

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, classes)``, float32 on the CPU, for a batch of preprocessed inputs."""
        x = self.check_batch(batch).to(device=self.device, dtype=self.dtype)   # cast the inputs too
        logits = self._fn(x)
        return torch.softmax(torch.as_tensor(logits).float(), dim=1).cpu()

    def encode(self, probabilities: torch.Tensor, top_k: int | None = None) -> list[Prediction]:
        """The ``top_k`` (default: the spec's) most probable classes of one row of probabilities."""
        k = self.spec.top_k if top_k is None else top_k
        if not 1 <= k <= len(self.labels):
            raise ValueError(f"top_k must be in 1..{len(self.labels)}, got {k}")
        values, indices = probabilities.topk(min(k, probabilities.numel()))
        return [Prediction(int(i), self.labels[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]

    # ------------------------------------------------------------------ all four at once
    def classify(self, item: bytes | Image.Image | torch.Tensor, top_k: int | None = None) -> list[Prediction]:
        """Upload bytes, a PIL image or one preprocessed input -> its top-k classes."""
        if isinstance(item, bytes | bytearray):
            item = self.decode(bytes(item))
        x = self.preprocess(item) if isinstance(item, Image.Image) else item
        return self.encode(self.predict(x)[0], top_k)

    def classify_batch(self, batch: torch.Tensor, top_k: int | None = None) -> list[list[Prediction]]:
        """A batch of preprocessed inputs -> the top-k classes of each."""
        return [self.encode(row, top_k) for row in self.predict(batch)]
