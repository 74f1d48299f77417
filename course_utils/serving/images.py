"""Turning untrusted upload bytes into a PIL image, or a clear client error.

Every check runs **before** the pixels are decoded, where it can: an empty body, a declared
content type that is not an image, a file Pillow cannot identify, a format we do not accept,
and a decompression bomb (a small file that declares an enormous image) are refused from the
header alone. Only then are the pixels decoded, and a truncated or corrupt file becomes a 400.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import ServingError

#: Formats a camera, phone or browser produces, as Pillow names them.
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})
#: Declared content types that are not refused outright (the bytes decide).
ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: larger than any phone photo, far below a bomb


def check_content_type(content_type: str | None) -> None:
    """Refuse a part that declares a non-image type (a PDF, a text file); allow unknown ones."""
    if not content_type:
        return
    base = content_type.split(";")[0].strip().lower()
    if base and not base.startswith(ACCEPTED_CONTENT_TYPES):
        raise ServingError(415, "unsupported_media_type",
                           f"uploads must be images (image/png, image/jpeg, ...); got content type {base!r}")


def decode_image(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode upload bytes into an RGB/L/... PIL image with EXIF orientation applied.

    Raises :class:`ServingError` with status 400 (empty, not an image, truncated or corrupt),
    413 (too many pixels: refused before decoding) or 415 (a format we do not accept).
    """
    if not raw:
        raise ServingError(400, "empty_file", "the uploaded file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image: Image.Image = Image.open(io.BytesIO(raw))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ServingError(413, "image_too_large",
                               f"the image declares more than {max_pixels:,} pixels; refused before decoding") from None
        except UnidentifiedImageError:
            raise ServingError(400, "not_an_image",
                               "the file is not an image Pillow can read; send PNG, JPEG, GIF, WebP, BMP or TIFF") from None
        except Exception as error:  # a header so broken that Pillow fails while identifying it
            raise ServingError(400, "corrupt_image", f"the image header could not be read ({error})") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ServingError(415, "unsupported_image_format",
                           f"{image.format} images are not accepted; send PNG, JPEG, GIF, WebP, BMP or TIFF")
    width, height = image.size
    if width < 1 or height < 1:
        raise ServingError(400, "corrupt_image", f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ServingError(413, "image_too_large",
                           f"the image is {width}x{height} = {width * height:,} pixels, more than the "
                           f"{max_pixels:,} accepted; refused before decoding")
    try:
        image.seek(0)           # first frame of an animated GIF/WebP/multi-page TIFF
        image.load()            # decode now, so truncation is detected here
        image = ImageOps.exif_transpose(image)  # phone photos: apply the EXIF rotation
    except Exception as error:
        raise ServingError(400, "corrupt_image", f"the image could not be decoded: {error}") from None
    return image
