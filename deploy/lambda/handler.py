"""AWS Lambda handler for API Gateway (REST API v1 and HTTP API v2 events), ONNX Runtime only.

No PyTorch: the CUDA torch wheel alone is several GB and even the CPU one is far over Lambda's
250 MB unzipped limit for a zip package, while onnxruntime + numpy + Pillow fit. The model is
`model.onnx` next to this file (or $MODEL_PATH), loaded once per container (cold start), outside
the handler, and reused by every warm invocation.

Request: POST with the image as the body (binary media type: API Gateway sets isBase64Encoded),
or a JSON body {"image": "<base64>", "top_k": 3}. Optional query string ?top_k=.
Response: 200 {"success": true, "predictions": [...], "model_version": ...}, or 400 with
{"success": false, "error": {"code", "message"}}: never a 500 for a bad request.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from pathlib import Path

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

_started = time.perf_counter()
_options = ort.SessionOptions()
_options.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))   # Lambda: ~1 vCPU per 1.8 GB
SESSION = ort.InferenceSession(str(MODEL_PATH), sess_options=_options, providers=["CPUExecutionProvider"])
INPUT_NAME = SESSION.get_inputs()[0].name
INIT_SECONDS = time.perf_counter() - _started


def _response(status: int, body: dict[str, object]) -> dict[str, object]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": json.dumps(body)}


def _error(status: int, code: str, message: str) -> dict[str, object]:
    return _response(status, pre.error_body(code, message))


def _image_bytes(event: dict) -> tuple[bytes, dict]:
    """The image bytes and any JSON options from a REST (v1) or HTTP API (v2) event."""
    body = event.get("body")
    if body is None:
        raise pre.BadImage("the request has no body: send the image, or JSON {\"image\": \"<base64>\"}")
    headers = {k.lower(): v for k, v in (event.get("headers") or {}).items()}
    raw = base64.b64decode(body, validate=True) if event.get("isBase64Encoded") else body.encode("latin-1")
    if headers.get("content-type", "").startswith("application/json") or raw[:1] == b"{":
        try:
            payload = json.loads(raw)
            return base64.b64decode(payload["image"], validate=True), payload
        except (ValueError, KeyError, TypeError):
            raise pre.BadImage("a JSON body must be {\"image\": \"<base64-encoded image>\"}") from None
    return raw, {}


def lambda_handler(event: dict, context: object) -> dict[str, object]:
    started = time.perf_counter()
    if not isinstance(event, dict):
        return _error(400, "bad_event", "the event is not an API Gateway request")
    try:
        raw, options = _image_bytes(event)
        query = event.get("queryStringParameters") or {}
        top_k = int(options.get("top_k", query.get("top_k", 3)))
        if not 1 <= top_k <= len(pre.LABELS):
            return _error(400, "invalid_parameter", f"top_k must be an integer from 1 to {len(pre.LABELS)}")
        x = pre.preprocess(pre.decode(raw))[None]
    except (binascii.Error, UnicodeEncodeError):
        return _error(400, "bad_encoding", "the body is not valid base64")
    except (TypeError, ValueError) as error:  # BadImage is a ValueError; int() too
        return _error(400, "bad_request", str(error))
    logits = SESSION.run(None, {INPUT_NAME: x})[0][0]
    return _response(200, {"success": True, "predictions": pre.encode(pre.softmax(logits), top_k),
                           "model_version": MODEL_VERSION,
                           "latency_ms": round((time.perf_counter() - started) * 1000, 3)})
