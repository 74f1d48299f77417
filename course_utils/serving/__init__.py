"""The course's inference service: one predictor, two front ends (Flask, FastAPI), one HTTP contract.

* ``POST /predict`` - multipart upload in field ``file`` (or ``image``); ``?top_k=``;
  ``X-API-Key`` when the service has a key. Answers ``{"success", "predictions", "model_version",
  "latency_ms"}`` or ``{"success": false, "error": {"code", "message"}}`` with 400/401/413/415/422.
* ``GET /health`` (liveness), ``GET /ready`` (model loaded and warmed up), ``GET /metrics``
  (Prometheus text format).

Start it with ``python -m course_utils.serving`` (``make serve``); see ``--help``.
"""

from .background import free_port, serve_asgi_in_thread, serve_in_background, serve_wsgi_in_thread, wait_until_ready
from .batching import DynamicBatcher
from .images import ServingError, decode_image
from .loadgen import LoadResult, run_load
from .predictor import Prediction, Predictor
from .service import InferenceService, ServiceConfig

__all__ = ["DynamicBatcher", "InferenceService", "LoadResult", "Prediction", "Predictor", "ServiceConfig", "ServingError",
           "decode_image", "free_port", "run_load", "serve_asgi_in_thread", "serve_in_background", "serve_wsgi_in_thread",
           "wait_until_ready"]
