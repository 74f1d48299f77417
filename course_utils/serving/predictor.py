"""One predictor interface over every model format the course produces.

``Predictor.load(path)`` recognises the file:

* ``.onnx`` - ONNX Runtime (CUDA provider first on a GPU, checked), **without importing torch**:
  numpy in, numpy out, so a container that serves ONNX needs no torch wheel;
* ``.pt2`` - a ``torch.export`` program, or an AOTInductor package;
* ``.pt`` / ``.pth`` - a TorchScript archive, or a ``state_dict`` of the course's DigitsCNN
  (loaded with ``weights_only=True``; never a pickled module).

and reads the model's :class:`~.spec.ModelSpec` (preprocessing, labels) from the sidecar next to
the file; without one, the model is the course's digits CNN.

Whatever the format, a request goes through the same four stages, named as the field names them
(TorchServe, KServe, LitServe): **decode** (bytes -> image), **preprocess** (image -> tensor),
**predict** (batch -> class probabilities) and **encode** (probabilities -> top-k answer).
:meth:`Predictor.classify` runs all four; a server that batches requests calls them one by one,
with its batcher between preprocess and predict.

Two faces of the same stages: ``preprocess_array`` / ``predict_array`` work on numpy arrays (what
the service uses, torch-free for ONNX); ``preprocess`` / ``predict`` take and give torch tensors
(what lessons and torch code use). Both run the same code underneath.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .. import data
from .images import DEFAULT_MAX_PIXELS, decode_image
from .spec import ModelSpec

if TYPE_CHECKING:
    import torch

ArrayFn = Callable[[np.ndarray], np.ndarray]


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

    ``fn`` is the model: a torch callable (tensor in, logits out) or, with ``takes_arrays=True``,
    a numpy one (an ONNX Runtime session's run).

    >>> p = Predictor.load()          # the committed checkpoint
    >>> p.kind, len(p.labels), p.spec.input_shape
    ('eager', 10, (1, 8, 8))
    """

    def __init__(self, fn: Callable[[Any], Any], kind: str, version: str, device: Any = "cpu",
                 spec: ModelSpec | None = None, dtype: Any = None, takes_arrays: bool = False) -> None:
        self.kind = kind
        self.version = version
        self.device = device
        self.dtype = dtype
        self.spec = spec or ModelSpec()
        self.ready = False
        self.source: Path | None = None   # the file it was loaded from (Predictor.load)
        self._probabilities: ArrayFn = _numpy_softmax(fn) if takes_arrays else _torch_softmax(fn, device, dtype)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @classmethod
    def load(cls, path: str | Path | None = None, device: Any = None, version: str | None = None,
             spec: ModelSpec | None = None, threads: int | None = None) -> Predictor:
        """Load a model file (default: the course's trained checkpoint), check it, and return a predictor.

        ``spec`` defaults to the sidecar next to the file (``<file>.spec.json``), else the digits spec.
        ``threads``: ONNX Runtime's intra-op threads (torch models use torch's setting).

        The model is run once on a blank input: a file that cannot be served raises
        :class:`ModelLoadError` with one line naming the file, the format it was taken for and why
        (not a valid ONNX file, a state_dict that does not fit, an output that is not
        ``(batch, classes)``, a spec that disagrees with the model, a failed sha256 check).
        """
        if path is None:
            from .. import models

            try:
                path = models.checkpoint_path()
            except data.DataIntegrityError as error:
                raise ModelLoadError(Path(models.CHECKPOINT), "the course's checkpoint", str(error)) from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        spec = spec or ModelSpec.for_model(path)
        digest = data.sha256_file(path)[:12]
        version = version or f"{path.stem}-{digest}"
        predictor = cls._open(path, device, version, spec, threads)
        predictor.source = path
        predictor.check()
        return predictor

    @classmethod
    def _open(cls, path: Path, device: Any, version: str, spec: ModelSpec, threads: int | None) -> Predictor:
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            kind = "an ONNX model"
            try:
                session = _onnx_session(path, device, threads)
            except Exception as error:  # ORT's InvalidProtobuf, Fail, NoSuchFile (external data), ...
                raise ModelLoadError(path, kind, f"onnxruntime cannot load it ({_ort_reason(error)})") from None
            inputs = session.get_inputs()
            if len(inputs) != 1:
                raise ModelLoadError(path, kind, f"it has {len(inputs)} inputs; the service feeds one image tensor")
            declared = tuple(inputs[0].shape[1:])
            if len(declared) != 3 or any(isinstance(d, int) and d != s for d, s in zip(declared, spec.input_shape, strict=True)):
                raise ModelLoadError(path, kind, f"it takes inputs of shape {tuple(inputs[0].shape)}, but its spec "
                                                 f"says (N, {', '.join(map(str, spec.input_shape))})")
            input_name = inputs[0].name
            return cls(lambda x: session.run(None, {input_name: x})[0], "onnx", version, "cpu", spec,
                       takes_arrays=True)
        if suffix not in (".pt2", ".pt", ".pth"):
            raise ModelLoadError(path, f"a {suffix or 'suffix-less'} file",
                                 "unknown model format: use .pt/.pth (state_dict or TorchScript), .pt2 "
                                 "(torch.export or AOTInductor) or .onnx")
        import torch

        from .. import env, models

        device = torch.device(device) if device is not None else env.pick_device()
        if suffix == ".pt2":
            kind = "a torch.export program or AOTInductor package (.pt2)"
            if not zipfile.is_zipfile(path):
                raise ModelLoadError(path, kind, "it is not a zip archive, so neither torch.export.save nor "
                                                 "aoti_compile_and_package wrote it")
            try:
                if _is_aoti_package(path):
                    compiled = torch._inductor.aoti_load_package(str(path))
                    return cls(compiled, "aotinductor", version, torch.device("cpu"), spec)
                program = torch.export.load(str(path))
                return cls(program.module().to(device), "exported", version, device, spec)
            except Exception as error:
                raise ModelLoadError(path, kind, f"torch cannot load it ({_one_line(error)})") from None
        if _is_torchscript(path):
            try:
                scripted = torch.jit.load(str(path), map_location=device).eval()
            except Exception as error:
                raise ModelLoadError(path, "a TorchScript archive", f"torch.jit.load fails ({_one_line(error)})") from None
            return cls(scripted, "torchscript", version, device, spec)
        kind = "a state_dict of the course's DigitsCNN"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            text = " ".join(str(error).split())
            pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            unpickler = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text)
            if pickled:
                reason = (f"it holds a pickled {pickled.group(1)}, not only tensors, and torch.load(weights_only=True) "
                          f"will not run its code: save model.state_dict(), or export the model (.pt2, .onnx)")
            else:
                why = unpickler.group(1) if unpickler else _one_line(error)
                reason = f"it is neither a TorchScript archive nor a state_dict torch.load can read ({why})"
            raise ModelLoadError(path, kind, reason) from None
        problem = models.state_dict_problem(state, models.DigitsCNN())
        if problem:
            raise ModelLoadError(path, kind, problem)
        return cls(models.load_trained_cnn(device=device, path=path), "eager", version, device, spec)

    def check(self, batch: int = 1) -> None:
        """Run the model on a blank batch; a :class:`ModelLoadError` if it cannot serve its spec."""
        where = self.source or Path(self.version)
        kind = {"onnx": "an ONNX model", "exported": "a torch.export program", "aotinductor": "an AOTInductor package",
                "torchscript": "a TorchScript archive", "eager": "a state_dict of the course's DigitsCNN"
                }.get(self.kind, f"a {self.kind} model")
        shape = ", ".join(map(str, self.spec.input_shape))
        blank = np.repeat(self.preprocess_array(self.spec.blank_image())[None], batch, axis=0)
        try:
            probabilities = self.predict_array(blank)
        except Exception as error:
            static = " (exported with a fixed batch of 1? serve it with --max-batch-size 1)" if batch > 1 else ""
            raise ModelLoadError(where, kind, f"it fails on a batch of shape ({batch}, {shape}), as its spec "
                                              f"describes the input{static}: {_ort_reason(error)}") from None
        try:
            self.spec.check_outputs(probabilities.shape[1], "the model")
        except ValueError as error:
            raise ModelLoadError(where, kind, f"its spec disagrees with it: {error}") from None

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> float:
        """Run a few dummy batches (first calls pay for lazy initialisation); return seconds taken.

        Each is a :meth:`check`: a model that fails one, or whose outputs do not fit its spec's
        labels, raises :class:`ModelLoadError`.
        """
        start = time.perf_counter()
        for size in batch_sizes:
            self.check(batch=size)   # a ModelLoadError if the model cannot serve that batch
        self.ready = True
        return time.perf_counter() - start

    # ------------------------------------------------------------------ the four stages
    def decode(self, raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Upload bytes -> image, or a :class:`~.contract.ServingError` (400/413/415) saying why."""
        return decode_image(raw, max_pixels)

    def preprocess_array(self, image: Image.Image) -> np.ndarray:
        """One decoded image -> one model input (no batch dimension), as the spec says."""
        return self.spec.preprocess_array(image)

    def check_batch(self, batch: Any) -> np.ndarray:
        """A float32 array ``(N, *spec.input_shape)`` (one input may omit N) with finite values, or a ValueError."""
        x = np.asarray(batch.detach().cpu() if hasattr(batch, "detach") else batch)
        shape = self.spec.input_shape
        if x.ndim == len(shape):
            x = x[None]  # one input -> a batch of one
        if tuple(x.shape[1:]) != shape or x.shape[0] < 1:
            wanted = ", ".join(map(str, shape))
            raise ValueError(f"expected a batch (N, {wanted}) or one ({wanted}) input, got shape {tuple(x.shape)}")
        if x.dtype.kind != "f":
            raise ValueError(f"expected floating-point inputs, got {_dtype_name(batch, x)}")
        if not np.isfinite(x).all():
            raise ValueError("inputs contain NaN or infinity")
        return np.ascontiguousarray(x, dtype=np.float32)

    def predict_array(self, batch: Any) -> np.ndarray:
        """Class probabilities ``(N, classes)``, float32, for a batch of preprocessed inputs."""
        return self._probabilities(self.check_batch(batch))

    def encode(self, probabilities: Any, top_k: int | None = None) -> list[Prediction]:
        """The ``top_k`` (default: the spec's) most probable classes of one row of probabilities."""
        k = self.spec.top_k if top_k is None else top_k
        if not 1 <= k <= len(self.labels):
            raise ValueError(f"top_k must be in 1..{len(self.labels)}, got {k}")
        row = np.asarray(probabilities.detach().cpu() if hasattr(probabilities, "detach") else probabilities)
        order = np.argsort(-row, kind="stable")[:k]
        return [Prediction(int(i), self.labels[int(i)], float(row[i])) for i in order]

    # ------------------------------------------------------------------ the torch face
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> one model input as a torch tensor."""
        import torch

        return torch.from_numpy(self.preprocess_array(image))

    def predict(self, batch: Any) -> torch.Tensor:
        """Class probabilities ``(N, classes)`` as a float32 CPU tensor."""
        import torch

        return torch.from_numpy(self.predict_array(batch))

    # ------------------------------------------------------------------ all four at once
    def classify(self, item: bytes | Image.Image | Any, top_k: int | None = None) -> list[Prediction]:
        """Upload bytes, a PIL image or one preprocessed input (array or tensor) -> its top-k classes."""
        if isinstance(item, bytes | bytearray):
            item = self.decode(bytes(item))
        x = self.preprocess_array(item) if isinstance(item, Image.Image) else item
        return self.encode(self.predict_array(x)[0], top_k)

    def classify_batch(self, batch: Any, top_k: int | None = None) -> list[list[Prediction]]:
        """A batch of preprocessed inputs -> the top-k classes of each."""
        return [self.encode(row, top_k) for row in self.predict_array(batch)]


class ModelLoadError(ValueError):
    """A model file that cannot be served; the message is one line: the file, what it was taken for, why."""

    def __init__(self, path: Path, kind: str, reason: str) -> None:
        self.path, self.kind, self.reason = path, kind, reason
        super().__init__(f"cannot serve {path} as {kind}: {reason}")


def _one_line(error: BaseException | str, limit: int = 200) -> str:
    """A library's error message on one line, at most ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ort_reason(error: BaseException) -> str:
    """ONNX Runtime's message without its ``[ONNXRuntimeError] : 7 :`` prefix and repeated file path."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : ", "", " ".join(str(error).split()))
    return _one_line(re.sub(r"Load model from \S+ failed: ?", "", text))


def _check_logits(shape: tuple[int, ...], batch: int) -> None:
    if len(shape) != 2 or shape[0] != batch:
        raise ValueError(f"the model's output has shape {shape} for a batch of {batch}; expected ({batch}, classes)")


def _dtype_name(original: Any, array: np.ndarray) -> str:
    return str(getattr(original, "dtype", array.dtype))


def _numpy_softmax(fn: ArrayFn) -> ArrayFn:
    def probabilities(x: np.ndarray) -> np.ndarray:
        logits = np.asarray(fn(x), dtype=np.float32)
        _check_logits(tuple(logits.shape), len(x))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    return probabilities


def _torch_softmax(fn: Callable[[Any], Any], device: Any, dtype: Any) -> ArrayFn:
    import torch

    dtype = dtype or torch.float32

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = fn(torch.from_numpy(x).to(device=device, dtype=dtype))   # cast the inputs too
            _check_logits(tuple(getattr(logits, "shape", ())), len(x))
            return torch.softmax(torch.as_tensor(logits).float(), dim=1).cpu().numpy()
    return probabilities


def _onnx_session(path: Path, device: Any, threads: int | None) -> Any:
    """An ORT session: CUDA if asked for (strictly), or offered and working when no device is named."""
    from ..ort import ort_providers, ort_session

    wanted = device if device is not None else os.environ.get("COURSE_DEVICE") or None
    if wanted is not None:
        return ort_session(path, providers=ort_providers(wanted), threads=threads)
    try:
        return ort_session(path, providers=ort_providers("cuda"), threads=threads)
    except RuntimeError:   # onnxruntime-gpu installed but no usable GPU: CPU it is
        return ort_session(path, providers=["CPUExecutionProvider"], threads=threads)
