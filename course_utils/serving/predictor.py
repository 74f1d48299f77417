"""One predictor interface over every model format the course produces.

``Predictor.load(path)`` recognises the file:

* ``.onnx`` - ONNX Runtime (CUDA provider first on a GPU, checked);
* ``.pt2`` - a ``torch.export`` program, or an AOTInductor package;
* ``.pt`` / ``.pth`` - a TorchScript archive, or a ``state_dict`` of the course's DigitsCNN
  (loaded with ``weights_only=True``; never a pickled module).

Whatever the format, :meth:`Predictor.predict` takes a batch of preprocessed images and returns
class probabilities, under ``torch.inference_mode``.
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
    """A loaded, warmed-up model plus its preprocessing and labels.

    >>> p = Predictor.load()          # the committed checkpoint
    >>> p.kind, len(p.labels)
    ('eager', 10)
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], kind: str, version: str,
                 device: torch.device, labels: Sequence[str] = data.CLASS_LABELS,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None) -> None:
        self._fn = fn
        self.kind = kind
        self.version = version
        self.device = device
        self.labels = tuple(labels)
        self.transform = transform or data.digits_transform()
        self.ready = False

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device | None = None,
             version: str | None = None) -> Predictor:
        """Load a model file (default: the course's trained checkpoint) and return a predictor."""
        device = torch.device(device) if device is not None else env.pick_device()
        path = models.checkpoint_path() if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        digest = data.sha256_file(path)[:12]
        version = version or f"{path.stem}-{digest}"
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            session = export.ort_session(path, providers=export.ort_providers(device))
            runner = export.OrtRunner(session)
            return cls(runner, "onnx", version, torch.device("cpu"))
        if suffix == ".pt2":
            if _is_aoti_package(path):
                compiled = torch._inductor.aoti_load_package(str(path))
                return cls(compiled, "aotinductor", version, torch.device("cpu"))
            program = torch.export.load(str(path))
            return cls(program.module().to(device), "exported", version, device)
        if suffix in (".pt", ".pth"):
            if _is_torchscript(path):
                scripted = torch.jit.load(str(path), map_location=device).eval()
                return cls(scripted, "torchscript", version, device)
            model = models.load_trained_cnn(device=device, path=path)
            return cls(model, "eager", version, device)
        raise ValueError(f"unknown model format {suffix!r}: use .pt/.pth (state_dict or TorchScript), "
                         ".pt2 (torch.export or AOTInductor) or .onnx")

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> float:
        """Run a few dummy batches (first calls pay for lazy initialisation); return seconds taken."""
        start = time.perf_counter()
        blank = Image.new("L", (8, 8), 255)
        one = self.transform(blank)
        for size in batch_sizes:
            self.predict(one.unsqueeze(0).expand(size, *one.shape).contiguous())
        self.ready = True
        return time.perf_counter() - start

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> one model input (no batch dimension)."""
        return self.transform(image)

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, C)`` on the CPU for a batch of preprocessed images."""
        if batch.dim() != 4:
            raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(batch.shape)}")
        logits = self._fn(batch.to(self.device))
        return torch.softmax(torch.as_tensor(logits).float(), dim=1).cpu()

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[Prediction]:
        """The ``k`` most probable classes of one row of probabilities."""
        values, indices = probabilities.topk(min(k, probabilities.numel()))
        return [Prediction(int(i), self.labels[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]
