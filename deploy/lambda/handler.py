"""AWS Lambda handler for HTTP requests (API Gateway REST v1 and HTTP API v2 events, function URLs).

No PyTorch: the CUDA torch wheel alone is several GB and even the CPU one is far over Lambda's
250 MB unzipped limit for a zip package, while onnxruntime + numpy + Pillow fit. The model is
`model.onnx` next to this file (or $MODEL_PATH), loaded once per container (cold start), outside
the handler, and reused by every warm invocation.

Request: POST with the image as the body (binary media type: API Gateway sets isBase64Encoded),
or a JSON body {"image": "<base64>", "top_k": 3}; a direct invoke may pass that object itself as
"body". Optional query string ?top_k=.
Response: 200 {"success": true, "predictions": [...], "model_version": ...}, or the contract's
error envelope {"success": false, "error": {"code", "message"}} with its status (400, 405, 413,
415, 422) for anything a client sent wrong, whatever the event's shape: an exception never
escapes (API Gateway would turn it into a bare 502). A failure of the model itself is a 500 with
the same envelope, and is logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

try:  # deployed: the file sits next to this one in the zip
    import digits_preprocess as pre
except ImportError:  # in the repository: deploy/common
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
    import digits_preprocess as pre

HERE = Path(__file__).resolve().parent
MODEL_PATH = Path(os.environ.get("MODEL_PATH", HERE / "model.onnx"))  # absolute: never the working directory
MODEL_VERSION = os.environ.get("MODEL_VERSION", MODEL_PATH.stem)
MAX_UPLOAD_BYTES = int(os.environ.get("MAX_UPLOAD_BYTES", 10 * 2**20))   # as the HTTP service's default
LOG = logging.getLogger("handler")

_started = time.perf_counter()
_options = ort.SessionOptions()
_options.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))   # Lambda: ~1 vCPU per 1.8 GB
SESSION = ort.InferenceSession(str(MODEL_PATH), sess_options=_options, providers=["CPUExecutionProvider"])
INPUT_NAME = SESSION.get_inputs()[0].name
INIT_SECONDS = time.perf_counter() - _started

SEND = 'send the image as the body, or JSON {"image": "<base64>"}'


def _response(status: int, body: dict[str, object]) -> dict[str, object]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}


def _error(status: int, code: str, message: str) -> dict[str, object]:
    return _response(status, pre.error_body(code, message))


def _not_http(event: dict) -> str | None:
    """What a non-HTTP event is (an S3 notification, a schedule, ...), or None if it may be a request."""
    records = event.get("Records")
    if isinstance(records, list) and records and isinstance(records[0], dict):
        source = records[0].get("eventSource") or records[0].get("EventSource") or "another service's"
        return f"an {source} event"
    if "source" in event and "detail-type" in event:
        return f"an EventBridge event from {event['source']}"
    if "body" not in event and "httpMethod" not in event and "requestContext" not in event:
        return "an event with no body, method or request context"
    return None


def _method(event: dict) -> str:
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, dict) else None
    method = event.get("httpMethod") or (http.get("method") if isinstance(http, dict) else None) or "POST"
    return str(method).upper()


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _mapping(value: object, lower: bool = False) -> dict[str, Any]:
    """Headers (``lower``: their names are case-insensitive) or query parameters; {} for null, a list, ..."""
    if not isinstance(value, dict):
        return {}
    return {str(k).lower() if lower else str(k): v for k, v in value.items()}


def _request(event: object) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the options (top_k) of any event, or the RequestError a client should see."""
    if not isinstance(event, dict):
        raise pre.RequestError(400, "bad_event", f"this function answers HTTP requests (API Gateway or a function "
                                                 f"URL), not a JSON {_json_type(event)}; {SEND}")
    other = _not_http(event)
    if other:
        raise pre.RequestError(400, "bad_event", f"this function answers HTTP requests (API Gateway or a function "
                                                 f"URL), not {other}; {SEND}")
    if _method(event) != "POST":
        raise pre.RequestError(405, "method_not_allowed", f"use POST, not {_method(event)}; {SEND}")
    query = {k: v for k, v in _mapping(event.get("queryStringParameters")).items() if k == "top_k"}
    body = event.get("body")
    if isinstance(body, dict):   # a direct invoke or a test event may pass the JSON object itself
        return _json_image(body), {**query, **body}
    if body is None or body == "":
        raise pre.RequestError(422, "missing_file", f"the request has no body: {SEND}")
    if not isinstance(body, str):
        raise pre.RequestError(400, "bad_request", f"the body is a JSON {_json_type(body)}: {SEND}")
    _check_size(body)
    flag = event.get("isBase64Encoded")
    text: str | None = None   # the body as text, when API Gateway did not base64-encode it
    if flag is True or (isinstance(flag, str) and flag.lower() == "true"):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise pre.RequestError(400, "bad_encoding", "isBase64Encoded is true but the body is not valid "
                                                        "base64") from None
    else:
        text = body
        try:
            raw = body.encode("latin-1")    # the bytes a binary body held, one per character
        except UnicodeEncodeError:
            raw = body.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_UPLOAD_BYTES:
        raise pre.RequestError(413, "payload_too_large",
                               f"the upload is {len(raw):,} bytes; the limit is {MAX_UPLOAD_BYTES:,}")
    content_type = str(_mapping(event.get("headers"), lower=True).get("content-type") or "")
    if content_type.startswith("application/json") or raw.lstrip()[:1] in (b"{", b"["):
        try:   # text is parsed as the text it is (re-encoding it would garble "café"); bytes as UTF-8
            payload = json.loads(text if text is not None else raw)
        except (ValueError, RecursionError) as error:   # RecursionError: JSON nested thousands deep
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
            raise pre.RequestError(400, "bad_json", f"the body is not valid JSON ({reason}); {SEND}") from None
        if not isinstance(payload, dict):
            raise pre.RequestError(400, "bad_request", f"the JSON body is a{'n' * (_json_type(payload) == 'array')} "
                                                       f"{_json_type(payload)}, not an object: {SEND}")
        return _json_image(payload), {**query, **payload}
    return raw, query


def _check_size(encoded: str) -> None:
    """413 before decoding a base64 text whose decoded bytes would be over the limit."""
    if len(encoded) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise pre.RequestError(413, "payload_too_large", f"the upload is larger than the {MAX_UPLOAD_BYTES:,}-byte "
                                                         f"limit")


def _json_image(payload: dict[str, Any]) -> bytes:
    image = payload.get("image")
    if image is None:
        raise pre.RequestError(422, "missing_file", f'the JSON body has no "image" field: {SEND}')
    if not isinstance(image, str):
        raise pre.RequestError(400, "bad_encoding", f'"image" must be a base64 string, not a {_json_type(image)}')
    _check_size(image)
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise pre.RequestError(400, "bad_encoding", '"image" is not valid base64') from None


def lambda_handler(event: object, context: object) -> dict[str, object]:
    started = time.perf_counter()
    try:
        raw, options = _request(event)
        top_k = pre.parse_top_k(options.get("top_k"))
        image = pre.decode(raw)
        try:
            x = pre.preprocess(image)[None]
        except Exception as error:   # a mode Pillow cannot convert (CIELAB, ...): the service's 400
            raise pre.RequestError(400, "unprocessable_image", f"the image could not be preprocessed: {error}") from None
    except pre.RequestError as error:
        return _error(error.status, error.code, error.message)
    except Exception:  # a bug of ours, not the caller's: logged, answered in the envelope, never a bare 502
        LOG.exception("the request could not be read")
        return _error(500, "internal_error", pre.INTERNAL_ERROR_MESSAGE)
    try:
        logits = SESSION.run(None, {INPUT_NAME: x})[0][0]
        return _response(200, {"success": True, "predictions": pre.encode(pre.softmax(logits), top_k),
                               "model_version": MODEL_VERSION,
                               "latency_ms": round((time.perf_counter() - started) * 1000, 3)})
    except Exception:
        LOG.exception("inference failed")
        return _error(500, "internal_error", pre.INTERNAL_ERROR_MESSAGE)
