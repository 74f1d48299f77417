"""The course's predictor stages without torch, for the digits model: decode, preprocess, encode.

Deployment targets that cannot carry PyTorch or the course's package (an AWS Lambda zip, a
TorchServe archive that must be self-contained) copy this one file. It is the torch-free twin of
``course_utils.serving.Predictor`` (same stage names, same numbers as the digits ``ModelSpec``,
the same error codes, messages and envelope as ``course_utils.serving.contract``);
tests/test_deploy.py pins each function to the package's.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DIGITS_MEAN = 0.3049
DIGITS_STD = 0.3758
LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_TOP_K = 3
ACCEPTED_FORMATS = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"}
MAX_PIXELS = 40_000_000
INTERNAL_ERROR_MESSAGE = "the server failed; the error was logged"


class RequestError(ValueError):
    """A client error with the contract's status, stable code and message (``ServingError``'s twin)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BadImage(RequestError):
    """The bytes are not an image we accept; the message says why."""


def decode(raw: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> image, refusing what ``course_utils.serving.images.decode_image`` refuses, with its codes."""
    if not raw:
        raise BadImage(400, "empty_file", "the uploaded file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(413, "image_too_large",
                           f"the image declares more than {max_pixels:,} pixels; refused before decoding") from None
        except UnidentifiedImageError:
            raise BadImage(400, "not_an_image",
                           "the file is not an image Pillow can read; send PNG, JPEG, GIF, WebP, BMP or TIFF") from None
        except Exception as error:
            raise BadImage(400, "corrupt_image", f"the image header could not be read ({error})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise BadImage(415, "unsupported_image_format",
                       f"{image.format} images are not accepted; send PNG, JPEG, GIF, WebP, BMP or TIFF")
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(400, "corrupt_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(413, "image_too_large", f"the image is {width}x{height} = {width * height:,} pixels, more "
                                               f"than the {max_pixels:,} accepted; refused before decoding")
    try:
        image.seek(0)
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:
        raise BadImage(400, "corrupt_image", f"the image could not be decoded: {error}") from None


def parse_top_k(raw: object) -> int:
    """``top_k`` from a query string or a JSON body, as the service's ``parse_top_k`` reads it (422 if invalid)."""
    if raw is None or raw == "":
        return DEFAULT_TOP_K
    k = raw if isinstance(raw, int) and not isinstance(raw, bool) else 0
    if isinstance(raw, str):
        try:
            k = int(raw)
        except ValueError:
            k = 0
    if not 1 <= k <= len(LABELS):
        raise RequestError(422, "invalid_parameter", f"top_k must be an integer from 1 to {len(LABELS)}, got {raw!r}")
    return k


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
