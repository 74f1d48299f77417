"""The course's predictor stages without torch, for the digits model: decode, preprocess, encode.

Deployment targets that cannot carry PyTorch or the course's package (an AWS Lambda zip, a
TorchServe archive that must be self-contained) copy this one file. It is the torch-free twin of
``course_utils.serving.Predictor`` (same stage names, same numbers as the digits ``ModelSpec``,
the same error envelope as ``course_utils.serving.contract``); tests/test_deploy.py pins each
function to the package's.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DIGITS_MEAN = 0.3049
DIGITS_STD = 0.3758
LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCEPTED_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"}
MAX_PIXELS = 40_000_000


class BadImage(ValueError):
    """The bytes are not an image we accept; the message says why."""


def decode(raw: bytes) -> Image.Image:
    if not raw:
        raise BadImage("the image is empty")
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:
        raise BadImage("the body is not an image (send PNG, JPEG, GIF, WebP, BMP or TIFF)") from None
    if image.format not in ACCEPTED_FORMATS:
        raise BadImage(f"{image.format} images are not accepted")
    if image.size[0] * image.size[1] > MAX_PIXELS:
        raise BadImage(f"the image has more than {MAX_PIXELS:,} pixels")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:
        raise BadImage(f"the image could not be decoded: {error}") from None


def preprocess(image: Image.Image) -> np.ndarray:
    """Any image -> float32 (1, 8, 8): grey on white paper, box-resized, ink in [0, 1], normalised."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        grey = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("L")
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    else:
        grey = image.convert("L")
    small = np.asarray(grey.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    ink = 1.0 - small / 255.0
    return ((ink - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)[None, :, :]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def encode(probabilities: np.ndarray, k: int = 3) -> list[dict[str, object]]:
    """The top-k answer of one row of probabilities, as the course's service writes it."""
    order = np.argsort(-probabilities)[:k]
    return [{"class": int(i), "label": LABELS[int(i)], "probability": round(float(probabilities[i]), 6)} for i in order]


def error_body(code: str, message: str) -> dict[str, object]:
    """The error envelope of the course's HTTP contract."""
    return {"success": False, "error": {"code": code, "message": message}}
