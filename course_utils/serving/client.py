"""A client for the course's service that survives what servers do: retries with backoff, one request id.

A worker that dies (OOM-killed, a crash, a rolling restart) drops the connections it held; the
client sees a reset or a 502/503 from a proxy. ``/predict`` is idempotent - the same image gives
the same answer - so the right client answer is to retry, with exponential backoff and jitter so
that a crowd of clients does not hammer the survivors in lockstep, and with the **same**
``X-Request-ID`` on every attempt, so the request log shows a retried request as one id twice.
Never retry what is not idempotent (a payment, a write) without an idempotency key.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from typing import Any

import requests

from .contract import API_KEY_HEADER, REQUEST_ID_HEADER

#: Statuses worth retrying: the server (or a proxy in front of it) was not there to answer.
RETRY_STATUSES = frozenset({502, 503, 504})


def post_image(url: str, raw: bytes, content_type: str = "image/png", *, retries: int = 3, backoff_s: float = 0.1,
               timeout: float = 10.0, api_key: str | None = None, params: dict[str, Any] | None = None,
               session: requests.Session | None = None) -> tuple[requests.Response, int]:
    """POST ``raw`` to ``url`` (``.../predict``); returns (the last response, the number of retries).

    Connection errors (refused, reset, or an answer cut off by a dying worker) and 502/503/504 are
    retried up to ``retries`` times, after
    ``backoff_s * 2**attempt`` seconds (+ up to 50% jitter), or after the server's ``Retry-After``
    when it sends one (capped at 30 s); 4xx answers are never retried.
    The last connection error is raised if every attempt failed.
    """
    headers = {REQUEST_ID_HEADER: uuid.uuid4().hex}
    if api_key:
        headers[API_KEY_HEADER] = api_key
    http = session or requests
    for attempt in range(retries + 1):
        wait = backoff_s * 2**attempt * (1 + random.random() / 2)
        try:
            response = http.post(url, files={"file": ("upload", raw, content_type)}, headers=headers,
                                 params=params, timeout=timeout)
            if response.status_code not in RETRY_STATUSES or attempt == retries:
                return response, attempt
            told = _retry_after(response)
            if told:   # the server said when; a little jitter so that shed clients do not return in lockstep
                wait = max(wait, told * (1 + random.random() / 4))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            # refused, reset, or an answer cut off by a dying worker: nothing was delivered, /predict is idempotent
            if attempt == retries:
                raise
        time.sleep(wait)
    raise AssertionError("unreachable")


def _retry_after(response: requests.Response, cap_s: float = 30.0) -> float:
    """The server's ``Retry-After`` in seconds (the delay form), or 0 when it sent none."""
    value = response.headers.get("Retry-After", "")
    try:
        seconds = float(value)
    except ValueError:   # absent, or an HTTP date (not sent by the course's service)
        return 0.0
    return min(max(seconds, 0.0), cap_s) if math.isfinite(seconds) else 0.0
