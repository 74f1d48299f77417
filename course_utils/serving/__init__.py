"""The course's inference service: one predictor, two front ends (Flask, FastAPI), one HTTP contract.

* ``POST /predict`` - multipart upload in field ``file`` (or ``image``); ``?top_k=``;
  ``X-API-Key`` when the service has a key. Answers ``{"success", "predictions", "model_version",
  "latency_ms"}`` or ``{"success": false, "error": {"code", "message"}}`` with 400/401/413/415/422.
* ``GET /health`` (liveness), ``GET /ready`` (model loaded and warmed up; 503 while draining),
  ``GET /metrics`` (Prometheus text format).
* The Open Inference Protocol (v2) under ``/v2`` (:mod:`.v2`).

The contract's names live in :mod:`.contract`; a model's preprocessing and labels in its
:class:`ModelSpec` sidecar; :func:`post_image` is a client that retries what is safe to retry.

Start it with ``python -m course_utils.serving`` (``make serve``); see ``--help``.
"""

from .background import free_port, serve_asgi_in_thread, serve_in_background, serve_wsgi_in_thread, wait_until_ready
from .batching import DynamicBatcher
from .client import post_image
from .contract import ServingError
from .images import decode_image
from .loadgen import LoadResult, run_load
from .predictor import ModelLoadError, Prediction, Predictor
from .service import InferenceService, ServiceConfig
from .spec import ModelSpec, ModelSpecError

__all__ = ["DynamicBatcher", "InferenceService", "LoadResult", "ModelLoadError", "ModelSpec", "ModelSpecError",
           "Prediction", "Predictor", "ServiceConfig", "ServingError", "decode_image", "free_port", "post_image",
           "run_load", "serve_asgi_in_thread", "serve_in_background", "serve_wsgi_in_thread", "wait_until_ready"]
