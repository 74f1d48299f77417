"""The framework-agnostic core of the inference service.

Flask and FastAPI front ends differ in how they receive a request and send an answer; what they
do in between is the same and lives here: check the API key, validate parameters, decode the
upload, preprocess, run the model (through the dynamic batcher), and build the JSON answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import v2
from .batching import BatcherFull, DynamicBatcher
from .contract import API_KEY_HEADER, ServingError, overloaded, payload_too_large, request_id
from .images import DEFAULT_MAX_PIXELS, check_content_type
from .metrics import ServiceMetrics, endpoint_label
from .predictor import Predictor

ENV_PREFIX = "COURSE_SERVE_"
#: One JSON line per request on this logger (configure_request_logging sends it to stderr).
REQUEST_LOG = logging.getLogger("course_utils.serving.requests")


#: Requests that get a line in the request log (probes and metrics scrapes do not).
LOGGED_ENDPOINTS = ("/predict", "/v2/models/{name}/infer")


@dataclass
class RequestRecord:
    """What the front end learns about one request while answering it, for metrics and the log."""

    request_id: str
    method: str
    endpoint: str
    started: float
    predicted_class: int | None = None
    error_code: str | None = None
    finished: bool = False


class JsonLineFormatter(logging.Formatter):
    """Format a record's ``fields`` as one JSON object per line, with a UTC timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        return json.dumps({"time": stamp, "level": record.levelname.lower(), "event": record.getMessage(), **fields})


def configure_request_logging(stream=None) -> logging.Handler:
    """Send the request log to ``stream`` (default stderr) as JSON lines; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    REQUEST_LOG.handlers = [handler]
    REQUEST_LOG.setLevel(logging.INFO)
    REQUEST_LOG.propagate = False
    return handler


def warmup_batches(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a service warms up (and so checks) its model with: 1, and a batch if it batches.

    >>> warmup_batches(1), warmup_batches(32)
    ((1,), (1, 8))
    """
    return (1,) if max_batch_size <= 1 else (1, min(8, max_batch_size))


@dataclass
class ServiceConfig:
    """Everything a deployment may want to change; every field has an environment variable."""

    model_path: str | None = None          # COURSE_SERVE_MODEL_PATH (default: the trained checkpoint)
    spec_path: str | None = None           # COURSE_SERVE_SPEC_PATH (default: <model>.spec.json if present, else digits)
    device: str | None = None              # COURSE_SERVE_DEVICE (default: best available)
    api_key: str | None = None             # COURSE_SERVE_API_KEY (default: no auth)
    max_upload_bytes: int = 10 * 2**20     # COURSE_SERVE_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS   # COURSE_SERVE_MAX_PIXELS
    max_batch_size: int = 32               # COURSE_SERVE_MAX_BATCH_SIZE (1 = no batching)
    max_wait_ms: float = 0.0               # COURSE_SERVE_MAX_WAIT_MS (0 = greedy: take what is queued)
    max_queue: int = 256                   # COURSE_SERVE_MAX_QUEUE: inputs waiting for the model; past it 503 (0 = no cap)
    default_top_k: int = 0                 # COURSE_SERVE_DEFAULT_TOP_K (0 = the model spec's: digits 3, ImageNet 5)
    request_timeout_s: float = 30.0        # COURSE_SERVE_REQUEST_TIMEOUT_S
    model_version: str | None = None       # COURSE_SERVE_MODEL_VERSION (default: file name + sha256)
    threads: int = 0                       # COURSE_SERVE_THREADS: intra-op threads, torch or ORT (0 = default)
    drain_s: float = 0.0                   # COURSE_SERVE_DRAIN_S: on SIGTERM, serve (not ready) this long first
    grace_s: float = 20.0                  # COURSE_SERVE_GRACE_S: then finish accepted requests within this
    framework: str = field(default="fastapi", repr=False)

    @classmethod
    def from_env(cls, **overrides: object) -> ServiceConfig:
        """Read ``COURSE_SERVE_*`` variables (how the CLI passes options to uvicorn's workers)."""
        config = cls()
        for name, default in cls().__dict__.items():
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                kind = type(default) if default is not None else str
                try:
                    setattr(config, name, kind(raw))
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX + name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        for name, value in overrides.items():
            setattr(config, name, value)
        return config

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): str(v) for k, v in self.__dict__.items() if v is not None}


class InferenceService:
    """A loaded, warmed-up model behind the checks of the HTTP contract.

    ``predictor`` serves a predictor you built yourself (a ``ProductionModel``, say) instead of
    loading ``config.model_path``. ``run_batch`` hands the model calls of the async front end to
    an engine's own batching (Ray Serve's ``@serve.batch``, lesson 11) instead of the service's
    :class:`DynamicBatcher`: it takes a batch of preprocessed inputs and returns their probabilities.
    """

    def __init__(self, config: ServiceConfig, predictor: Predictor | None = None,
                 run_batch: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None) -> None:
        if config.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.config = config
        threads = config.threads if config.threads > 0 else None
        if predictor is None:
            from .spec import ModelSpec

            spec = ModelSpec.load(config.spec_path) if config.spec_path else None
            predictor = Predictor.load(config.model_path, device=config.device, version=config.model_version, spec=spec,
                                       threads=threads)
        if threads and predictor.kind != "onnx":    # per worker process: workers x threads <= cores
            import torch

            torch.set_num_threads(threads)
        self.predictor = predictor
        self.draining = False   # set on SIGTERM (lifecycle.install_drain): /ready answers 503 from then on
        self.metrics = ServiceMetrics(self.predictor.version, config.framework)
        self.predictor.warmup(warmup_batches(config.max_batch_size))
        self.run_batch = run_batch
        self.batcher: DynamicBatcher | None = None
        if config.max_batch_size > 1 and run_batch is None:
            self.batcher = DynamicBatcher(self.predictor.predict_array, config.max_batch_size, config.max_wait_ms,
                                          on_batch=self.metrics.batch_size.observe, max_queue=config.max_queue)

    # ------------------------------------------------------------------ checks
    @property
    def auth_enabled(self) -> bool:
        return bool(self.config.api_key)

    def check_api_key(self, provided: str | None) -> None:
        """401 unless auth is off or the key matches (compared in constant time)."""
        if not self.auth_enabled:
            return
        if not provided:
            raise ServingError(401, "missing_api_key", f"send your API key in the {API_KEY_HEADER} header")
        if not hmac.compare_digest(provided.encode(), str(self.config.api_key).encode()):
            raise ServingError(401, "invalid_api_key", f"the {API_KEY_HEADER} header does not hold a valid key")

    def parse_top_k(self, raw: str | None) -> int:
        """``?top_k=`` as an int in 1..number of classes, or a 422 saying what is accepted."""
        if raw is None or raw == "":
            return min(self.config.default_top_k or self.predictor.spec.top_k, len(self.predictor.labels))
        try:
            k = int(raw)
        except ValueError:
            k = 0
        if not 1 <= k <= len(self.predictor.labels):
            raise ServingError(422, "invalid_parameter",
                               f"top_k must be an integer from 1 to {len(self.predictor.labels)}, got {raw!r}")
        return k

    # ------------------------------------------------------------------ inference
    def prepare(self, raw: bytes, content_type: str | None) -> np.ndarray:
        """Bytes -> model input, or a ServingError (CPU work: run it off the event loop)."""
        if len(raw) > self.config.max_upload_bytes:
            raise payload_too_large(self.config.max_upload_bytes, len(raw))
        check_content_type(content_type)
        image = self.predictor.decode(raw, self.config.max_pixels)
        try:
            return self.predictor.preprocess_array(image)
        except Exception as error:
            raise ServingError(400, "unprocessable_image", f"the image could not be preprocessed: {error}") from None

    def _answer(self, probabilities: np.ndarray, top_k: int, started: float,
                record: RequestRecord | None) -> dict[str, Any]:
        predictions = self.predictor.encode(probabilities, top_k)
        if record is not None:
            record.predicted_class = predictions[0].index
        return {
            "success": True,
            "predictions": [p.as_json() for p in predictions],
            "model_version": self.predictor.version,
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for a batch, blocking, through the batcher when there is one."""
        if self.batcher is None:
            return self.predictor.predict_array(x)
        futures = self._submit(x)
        return np.stack([future.result(timeout=self.config.request_timeout_s) for future in futures])

    def _shed_if_full(self) -> None:
        """503 before any decoding when the queue is already full: shedding must be cheap."""
        if self.batcher is not None and self.batcher.full:
            raise overloaded(f"{self.batcher.waiting} inputs waiting for the model, at most {self.batcher.max_queue}")

    def _submit(self, x: np.ndarray) -> list[Any]:
        assert self.batcher is not None
        try:
            return self.batcher.submit_all(list(x))
        except BatcherFull as error:   # shed now rather than queue work that would time out anyway
            raise overloaded(str(error)) from None

    async def _run_async(self, x: np.ndarray) -> np.ndarray:
        """The same without blocking the event loop."""
        if self.run_batch is not None:      # the engine batches, sheds and measures; the timeout stays ours
            return await asyncio.wait_for(self.run_batch(x), self.config.request_timeout_s)
        if self.batcher is None:
            return await asyncio.get_running_loop().run_in_executor(None, self.predictor.predict_array, x)
        futures = [asyncio.wrap_future(future) for future in self._submit(x)]
        return np.stack(await asyncio.wait_for(asyncio.gather(*futures), self.config.request_timeout_s))

    def predict(self, raw: bytes, content_type: str | None, top_k: int,
                record: RequestRecord | None = None) -> dict[str, Any]:
        """The whole request, blocking: for threaded servers (Flask under waitress)."""
        started = time.perf_counter()
        self._shed_if_full()
        x = self.prepare(raw, content_type)
        return self._answer(self._run(x[None])[0], top_k, started, record)

    async def predict_async(self, raw: bytes, content_type: str | None, top_k: int,
                            record: RequestRecord | None = None) -> dict[str, Any]:
        """The whole request without blocking the event loop: for FastAPI."""
        started = time.perf_counter()
        self._shed_if_full()
        x = await asyncio.get_running_loop().run_in_executor(None, self.prepare, raw, content_type)  # decode in a thread
        return self._answer((await self._run_async(x[None]))[0], top_k, started, record)

    # ------------------------------------------------------------------ the Open Inference Protocol
    def infer_v2(self, name: str, body: bytes, header_length: str | None) -> v2.InferAnswer:
        """``POST /v2/models/{name}/infer``, blocking."""
        v2.check_model(self.predictor, name)
        request = v2.parse_infer_request(self.predictor, body, header_length)
        return v2.encode_infer_response(self.predictor, name, request, self._run(request.inputs))

    async def infer_v2_async(self, name: str, body: bytes, header_length: str | None) -> v2.InferAnswer:
        v2.check_model(self.predictor, name)
        request = v2.parse_infer_request(self.predictor, body, header_length)
        return v2.encode_infer_response(self.predictor, name, request, await self._run_async(request.inputs))

    # ------------------------------------------------------------------ metrics and the request log
    def begin(self, method: str, path: str, incoming_id: str | None) -> RequestRecord:
        """Called by the front end when a request arrives."""
        self.metrics.in_flight.inc()
        return RequestRecord(request_id(incoming_id), method, endpoint_label(path), time.perf_counter())

    def finish(self, record: RequestRecord, status: int) -> None:
        """Called once when the answer leaves: metrics, and one JSON log line for inference requests."""
        if record.finished:
            return
        record.finished = True
        seconds = time.perf_counter() - record.started
        self.metrics.in_flight.dec()
        self.metrics.observe(record.endpoint, status, seconds)
        if record.endpoint in LOGGED_ENDPOINTS:
            self.log_request(record.request_id, record.method, record.endpoint, status, seconds * 1000,
                             record.predicted_class, record.error_code)

    def log_request(self, rid: str, method: str, path: str, status: int, latency_ms: float,
                    predicted_class: int | None = None, error_code: str | None = None) -> None:
        """One JSON line per request. Never the image, the API key or the client's address."""
        fields = {"request_id": rid, "method": method, "path": path, "status": status,
                  "latency_ms": round(latency_ms, 3), "model_version": self.predictor.version}
        if predicted_class is not None:
            fields["predicted_class"] = predicted_class
        if error_code is not None:
            fields["error_code"] = error_code
        REQUEST_LOG.info("request", extra={"fields": fields})

    # ------------------------------------------------------------------ probes
    def health(self) -> dict[str, object]:
        return {"status": "healthy"}

    @property
    def ready(self) -> bool:
        return self.predictor.ready and not self.draining

    def readiness(self) -> tuple[int, dict[str, object]]:
        ready = self.ready
        status = "draining" if self.draining else "ready" if ready else "loading"
        body: dict[str, object] = {"status": status, "model_version": self.predictor.version,
                "model_kind": self.predictor.kind, "device": str(self.predictor.device),
                "model_spec": self.predictor.spec.name, "classes": len(self.predictor.labels),
                "batching": {"max_batch_size": self.config.max_batch_size, "max_wait_ms": self.config.max_wait_ms,
                             "max_queue": self.config.max_queue},
                "limits": {"max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels},
                "auth": self.auth_enabled}
        return (200 if ready else 503), body

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
