"""The Open Inference Protocol (the "v2" protocol of KServe, Triton and Seldon), next to ``/predict``.

A client written for that protocol - Triton's ``tritonclient``, KServe's ``InferenceRESTClient``,
a plain ``curl`` - talks to this service without changes, and the service can later be swapped
for Triton or KServe without touching the client. The routes:

* ``GET /v2`` (server metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``;
* ``GET /v2/models/{name}`` (inputs and outputs: names, datatypes, shapes), ``GET /v2/models/{name}/ready``;
* ``POST /v2/models/{name}/infer`` - a tensor in, class probabilities out.

The input is the *preprocessed* tensor ``input`` (FP32, ``[N, C, H, W]`` as the model spec says);
the output is ``probabilities`` (FP32, ``[N, classes]``). Both JSON tensors (``"data": [...]``)
and the protocol's binary tensor extension (``Inference-Header-Content-Length``) are accepted, as
``tritonclient`` sends binary by default. Errors answer ``{"error": "<message>", "code": "<code>"}``.
The same API key, body limit and batcher as ``/predict`` apply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .contract import ServingError
from .predictor import Predictor

INFER_HEADER = "Inference-Header-Content-Length"
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
#: Most inputs in one infer request (a larger batch is the client's to split).
MAX_INPUTS = 256
_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}


@dataclass
class InferRequest:
    id: str | None
    inputs: np.ndarray
    binary_output: bool


@dataclass
class InferAnswer:
    body: bytes
    headers: dict[str, str]
    media_type: str


def server_metadata() -> dict[str, Any]:
    from importlib.metadata import version

    return {"name": "course_utils.serving", "version": version("course_utils"), "extensions": ["binary_tensor_data"]}


def check_model(predictor: Predictor, name: str) -> None:
    if name != predictor.spec.name:
        raise ServingError(404, "unknown_model", f"unknown model {name!r}: this server serves {predictor.spec.name!r}")


def model_metadata(predictor: Predictor, name: str) -> dict[str, Any]:
    check_model(predictor, name)
    return {"name": name, "versions": [predictor.version], "platform": f"course_utils_{predictor.kind}",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *predictor.spec.input_shape]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(predictor.labels)]}]}


def _bad(message: str, code: str = "invalid_tensor", status: int = 400) -> ServingError:
    return ServingError(status, code, message)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object, got {type(value).__name__}", "bad_request")
    return value


def parse_infer_request(predictor: Predictor, body: bytes, header_length: str | None) -> InferRequest:
    """The request body (JSON, or JSON + binary tensors) -> a checked float32 batch, or a 4xx."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _bad(f"{INFER_HEADER} must be the length of the JSON header, at most the body's "
                       f"{len(body):,} bytes; got {header_length!r}", "bad_request")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("the body is not a JSON inference request", "bad_request") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or len(request["inputs"]) != 1:
        raise _bad(f"an inference request has \"inputs\": [one tensor named {INPUT_NAME!r}]", "bad_request")
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("name") != INPUT_NAME:
        raise _bad(f"the input tensor must be named {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if datatype not in _DTYPES:
        raise _bad(f"datatype must be one of {', '.join(_DTYPES)}, got {datatype!r}")
    shape = tensor.get("shape")
    wanted = list(predictor.spec.input_shape)
    if not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(v, int) for v in shape) \
            or shape[1:] != wanted or not 1 <= shape[0] <= MAX_INPUTS:
        raise _bad(f"shape must be [N, {', '.join(map(str, wanted))}] with N from 1 to {MAX_INPUTS}, got {shape!r}")
    count = math.prod(shape)
    dtype = _DTYPES[datatype]
    parameters = _object(tensor.get("parameters"), "the input's \"parameters\"")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if size != count * np.dtype(dtype).itemsize or size != len(binary):
            raise _bad(f"binary_data_size is {size!r}; a {datatype} tensor of shape {shape} is "
                       f"{count * np.dtype(dtype).itemsize:,} bytes and the body holds {len(binary):,}")
        array = np.frombuffer(binary, dtype=dtype)
    else:
        try:
            array = np.asarray(tensor.get("data"), dtype=dtype).reshape(-1)
        except (TypeError, ValueError):
            raise _bad("\"data\" must be a list of numbers") from None
        if array.size != count:
            raise _bad(f"\"data\" has {array.size:,} values; shape {shape} needs {count:,}")
    x = np.ascontiguousarray(array.astype(np.float32).reshape(shape))
    if not np.isfinite(x).all():
        raise _bad("the input contains NaN or infinity")
    request_parameters = _object(request.get("parameters"), "the request's \"parameters\"")
    binary_output = bool(request_parameters.get("binary_data_output", False))
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise _bad("\"outputs\" must be a list", "bad_request")
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != OUTPUT_NAME:
            raise _bad(f"the only output is {OUTPUT_NAME!r}, asked for {output!r:.80}", "unknown_output")
        binary_output = bool(_object(output.get("parameters"), "an output's \"parameters\"").get("binary_data",
                                                                                              binary_output))
    rid = request.get("id")
    return InferRequest(str(rid) if rid is not None else None, x, binary_output)


def encode_infer_response(predictor: Predictor, name: str, request: InferRequest,
                          probabilities: np.ndarray) -> InferAnswer:
    """Class probabilities -> the protocol's answer, binary if the client asked for it."""
    array = np.asarray(probabilities, dtype=np.float32)
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(array.shape)}
    answer: dict[str, Any] = {"model_name": name, "model_version": predictor.version, "outputs": [output]}
    if request.id is not None:
        answer["id"] = request.id
    if not request.binary_output:
        output["data"] = array.reshape(-1).tolist()
        return InferAnswer(json.dumps(answer).encode(), {}, "application/json")
    raw = array.tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(answer).encode()
    return InferAnswer(header + raw, {INFER_HEADER: str(len(header))}, "application/octet-stream")
