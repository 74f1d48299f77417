"""The HTTP contract of the inference service, in one place.

Every front end (FastAPI, Flask, the LitServe example) and the checklist of lesson 09 import
these names instead of re-typing them: the error type and its JSON envelope, the stable error
codes, the messages a client reads, the header names, the request id and the upload field names.

An error answer always looks like this, whatever the server::

    {"success": false, "error": {"code": "not_an_image", "message": "the file is not an image ..."}}

and the routes of the Open Inference Protocol (``/v2/...``, see :mod:`.v2`) answer
``{"error": "<message>", "code": "<code>"}``, the shape that protocol's clients expect.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

API_KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-ID"
#: Multipart field names of the upload, in the order they are looked up ("image" is the chapter's client).
UPLOAD_FIELDS = ("file", "image")
#: The stable code of an error the framework raises itself (unknown route, wrong method, ...).
HTTP_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
INTERNAL_ERROR_MESSAGE = "the server failed; the error was logged"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

T = TypeVar("T")


@dataclass
class ServingError(Exception):
    """A client error with an HTTP status, a stable machine-readable code and a human message."""

    status: int
    code: str
    message: str
    #: Extra response headers (``Retry-After`` on a 503).
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def error_body(code: str, message: str) -> dict[str, Any]:
    """The JSON envelope of every error answer of the course's own routes."""
    return {"success": False, "error": {"code": code, "message": message}}


def v2_error_body(code: str, message: str) -> dict[str, Any]:
    """The error shape of the Open Inference Protocol (``{"error": message}``), plus our stable code."""
    return {"error": message, "code": code}


def http_error_code(status: int) -> str:
    """The code for an error raised by the framework itself (404, 405, ...)."""
    return HTTP_ERROR_CODES.get(status, "http_error" if status < 500 else "internal_error")


def payload_too_large(limit_bytes: int, size: int | None = None) -> ServingError:
    """413 for an upload over the limit (``size`` when it is known)."""
    if size is None:
        return ServingError(413, "payload_too_large", f"the upload is larger than the {limit_bytes:,}-byte limit")
    return ServingError(413, "payload_too_large", f"the upload is {size:,} bytes; the limit is {limit_bytes:,}")


def overloaded(waiting: str, retry_after_s: int = 1) -> ServingError:
    """503 for a request shed under overload; ``Retry-After`` tells clients when to come back."""
    return ServingError(503, "overloaded", f"the service is at capacity ({waiting}); retry in {retry_after_s} s",
                        headers={"Retry-After": str(retry_after_s)})


def missing_file() -> ServingError:
    names = " or ".join(repr(name) for name in UPLOAD_FIELDS)
    return ServingError(422, "missing_file", f"send the image as a multipart form field named {names}")


def request_id(incoming: str | None) -> str:
    """Reuse a caller's X-Request-ID if it is a plain token (no log injection), else make one."""
    return incoming if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex


def pick_upload(files: Mapping[str, T | None]) -> T:
    """The uploaded file from a request's multipart fields, or the 422 that names the fields."""
    for name in UPLOAD_FIELDS:
        upload = files.get(name)
        if upload is not None:
            return upload
    raise missing_file()
