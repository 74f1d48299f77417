"""The course's dataset, its transforms and the sample images a learner sends to a server.

The data are scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" set:
1,797 real 8x8 scans with 17 grey levels (0 = paper, 16 = full ink). The splits live in
``data/digits/*.csv`` (one row an image: ``label,p0..p63``) and are checked against
``data/MANIFEST.sha256`` on every load, so a corrupted or edited file fails loudly.

Conventions, used everywhere in the course:

* **Tensors** fed to the CNN are ``float32`` of shape ``(N, 1, 8, 8)``: ink in ``[0, 1]``,
  then normalised with the training split's :data:`DIGITS_MEAN` / :data:`DIGITS_STD`.
* **Image files** look like a scan: dark ink on light paper. :func:`digits_transform` turns
  any such image (any size, any mode) into the tensor above.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where it is used: the ONNX service path never loads it
    import torch
    from torch.utils.data import DataLoader

MANIFEST = "MANIFEST.sha256"


def _data_dir() -> Path:
    """``$COURSE_DATA_DIR``, else the repository's ``data/`` (a clone, an editable install), else the
    copy that a wheel installs inside the package (``course_utils/_data``), if there is one.

    A clone never uses ``_data`` (it has none), so ``make data`` rebuilds the repository's ``data/``.
    """
    if os.environ.get("COURSE_DATA_DIR"):
        return Path(os.environ["COURSE_DATA_DIR"])
    here = Path(__file__).resolve().parent
    repository, packaged = here.parent / "data", here / "_data"
    return packaged if packaged.is_dir() and not (repository / MANIFEST).is_file() else repository


#: The dataset, samples and checkpoint: the repository's ``data/`` folder, or its copy in an installed wheel.
DATA_DIR = _data_dir()
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 8
LEVELS = 16  # the scans have values 0..16
CLASS_LABELS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
#: Mean and standard deviation of the training split's ink values in [0, 1]
#: (computed by ``python -m course_utils.build_data``, asserted in the tests).
DIGITS_MEAN = 0.3049
DIGITS_STD = 0.3758
#: The chapter's ImageNet statistics, for the 224x224 pipeline (``serving.spec.ModelSpec.imagenet``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataIntegrityError(RuntimeError):
    """A data file is missing or does not match its sha256 in the manifest."""


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(data_dir: str | Path = DATA_DIR) -> dict[str, str]:
    """Parse ``MANIFEST.sha256`` (``sha256sum`` format) into ``{relative path: sha256}``."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataIntegrityError(f"{path} is missing: rebuild with `python -m course_utils.build_data`")
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            entries[name.lstrip("*")] = digest
    return entries


def verify_file(relpath: str, data_dir: str | Path = DATA_DIR) -> Path:
    """Check one file under ``data_dir`` against the manifest and return its path.

    Raises :class:`DataIntegrityError` if the file is missing, not listed, or altered.
    """
    data_dir = Path(data_dir)
    expected = read_manifest(data_dir).get(relpath)
    if expected is None:
        raise DataIntegrityError(f"{relpath} is not listed in {data_dir / MANIFEST}")
    path = data_dir / relpath
    if not path.is_file():
        raise DataIntegrityError(f"{path} is missing: rebuild with `python -m course_utils.build_data`")
    actual = sha256_file(path)
    if actual != expected:
        raise DataIntegrityError(
            f"{path} has sha256 {actual[:12]}..., the manifest says {expected[:12]}...: the file was "
            "changed or corrupted (git checkout it, or rebuild with `python -m course_utils.build_data`)"
        )
    return path


def verify_manifest(data_dir: str | Path = DATA_DIR) -> int:
    """Verify every file listed in the manifest; return how many were checked."""
    names = read_manifest(data_dir)
    for name in names:
        verify_file(name, data_dir)
    return len(names)


@dataclass(frozen=True)
class DigitsSplit:
    """One split: ``images`` is ``uint8`` ``(N, 8, 8)`` with values 0..16, ``labels`` is ``int64 (N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_split(split: str, data_dir: str | Path = DATA_DIR) -> DigitsSplit:
    """Load ``"train"``, ``"val"`` or ``"test"`` after checking its sha256.

    >>> len(load_split("test"))
    360
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {SPLITS}")
    path = verify_file(f"digits/{split}.csv", data_dir)
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)
    labels = table[:, 0]
    images = table[:, 1:].reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    return DigitsSplit(images=images, labels=labels)


def normalize_ink(ink: torch.Tensor) -> torch.Tensor:
    """Normalise ink values in [0, 1] with the training split's mean and std."""
    return (ink - DIGITS_MEAN) / DIGITS_STD


def split_tensors(split: str, data_dir: str | Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)``: normalised ``float32 (N, 1, 8, 8)`` inputs and ``int64`` labels."""
    import torch

    data = load_split(split, data_dir)
    ink = torch.from_numpy(data.images).float().div_(LEVELS).unsqueeze(1)
    return normalize_ink(ink), torch.from_numpy(data.labels)


def make_loader(split: str, batch_size: int = 64, shuffle: bool | None = None, seed: int = 0) -> DataLoader:
    """A ``DataLoader`` over one split; shuffles the training split by default, reproducibly.

    >>> x, y = next(iter(make_loader("test", batch_size=4))); tuple(x.shape)
    (4, 1, 8, 8)
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x, y = split_tensors(split)
    shuffle = (split == "train") if shuffle is None else shuffle
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


class DigitsTransform:
    """Turn any image of a digit (dark ink on light paper, any size or mode) into a CNN input.

    Steps: flatten transparency onto white paper, convert to greyscale, shrink to 8x8 with a
    box filter (an exact average, so an image saved by :func:`digit_to_image` round-trips),
    invert to ink in [0, 1] and normalise. Returns ``float32 (1, 8, 8)``.
    """

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        grey = to_grey_on_white(image)
        small = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        ink = 1.0 - torch.from_numpy(np.asarray(small, dtype=np.float32)) / 255.0
        return normalize_ink(ink).unsqueeze(0)

    def __repr__(self) -> str:
        return (
            "DigitsTransform(grey on white -> box resize 8x8 -> ink = 1 - pixel/255 -> "
            f"normalize(mean={DIGITS_MEAN}, std={DIGITS_STD}))"
        )


def to_grey_on_white(image: Image.Image) -> Image.Image:
    """Convert any PIL image to mode ``L``; transparent pixels become white paper."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("L")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    return image.convert("L")


def digits_transform() -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing used by every digits lesson and by the server (see :class:`DigitsTransform`)."""
    return DigitsTransform()


def digit_to_image(pixels: np.ndarray, scale: int = 8) -> Image.Image:
    """Render one 8x8 scan (values 0..16) as a greyscale image, dark ink on white, ``scale``x larger."""
    pixels = np.asarray(pixels)
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected an 8x8 array, got shape {pixels.shape}")
    grey = np.rint(255.0 - pixels.astype(np.float64) * 255.0 / LEVELS).astype(np.uint8)
    image = Image.fromarray(grey, mode="L")
    return image.resize((IMAGE_SIZE * scale,) * 2, Image.Resampling.NEAREST)


def sample_images(data_dir: str | Path = DATA_DIR) -> list[Path]:
    """The sample files in ``data/samples`` (verified), sorted. Each name ends with its true label,
    e.g. ``digit_7.png``; see :func:`label_of_sample`."""
    names = sorted(n for n in read_manifest(data_dir) if n.startswith("samples/"))
    return [verify_file(n, data_dir) for n in names]


def sample_payloads(data_dir: str | Path = DATA_DIR) -> list[tuple[bytes, str, int]]:
    """The sample files as uploads for a load test: ``(bytes, content type, true label)`` each.

    >>> raw, content_type, label = sample_payloads()[0]; content_type, label, raw[:4]
    ('image/png', 0, b'\\x89PNG')
    """
    types = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
    return [(path.read_bytes(), types.get(path.suffix.lower(), "application/octet-stream"), label_of_sample(path))
            for path in sample_images(data_dir)]


def label_of_sample(path: str | Path) -> int:
    """The true label encoded in a sample's file name (``digit_7.png`` -> 7)."""
    stem = Path(path).stem
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: sample names end with _<label>, e.g. digit_7.png") from None
