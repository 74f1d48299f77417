"""The course service on Ray Serve: the same FastAPI app and HTTP contract, Ray's replicas and batching.

Each replica loads one :class:`~course_utils.serving.Predictor` and serves the course's own app
(``create_app``: ``/predict``, ``/ready``, ``/health``, ``/metrics``, ``/v2``), so a client cannot tell
it from ``python -m course_utils.serving``; the model calls go through ``@serve.batch``, which
batches across the requests that reach one replica. Every answer names the Ray node that served it
(``X-Ray-Node``). ``Canary`` splits traffic between two model versions (``Arm``) by a caller's key
(lesson 09's sticky split, done by the platform). Lesson 11 runs it; ``deploy/k8s/rayservice.yaml`` points here.

    PYTHONPATH=deploy/ray serve run serve_app:service    # one machine (inside a private network namespace!)
"""

# No `from __future__ import annotations` here: Ray pickles these classes by value, and cloudpickle
# keeps only the globals a function's code uses - FastAPI could not resolve string annotations.
import asyncio
import hashlib
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from course_utils.serving import InferenceService, Predictor, ServiceConfig, ServingError
from course_utils.serving.contract import error_body, pick_upload
from course_utils.serving.fastapi_app import create_app

MAX_BATCH = 8
#: What a cluster with room to grow would use instead of ``num_replicas`` (``CourseService.options(...)``):
#: keep 1-4 replicas, about 4 requests in flight each (the RayService manifest in deploy/k8s sets the same).
AUTOSCALING = {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 4}


@serve.deployment(num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  health_check_period_s=1, health_check_timeout_s=5, graceful_shutdown_timeout_s=5)
@serve.ingress()
class CourseService:
    """One replica: one predictor, the course's FastAPI app, Ray's dynamic batching."""

    def __init__(self, model_path: str | None = None, version: str | None = None) -> None:
        import ray

        self.config = ServiceConfig.from_env(model_path=model_path, model_version=version, threads=1)
        self.predictor = Predictor.load(self.config.model_path, version=self.config.model_version, threads=1)
        self.node = ray.get_runtime_context().get_node_id()[:8]

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.005)
    async def _predict_rows(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        batch = np.stack(rows)                                        # one model call for the whole batch,
        loop = asyncio.get_running_loop()                             # off the event loop
        return list(await loop.run_in_executor(None, self.predictor.predict_array, batch))

    async def _run_batch(self, x: np.ndarray) -> np.ndarray:
        return np.stack(await asyncio.gather(*(self._predict_rows(row) for row in x)))

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.config, self.predictor, run_batch=self._run_batch)

        @app.middleware("http")
        async def node_header(request, call_next):
            response = await call_next(request)
            response.headers["X-Ray-Node"] = self.node
            return response

        return app


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Arm:
    """One arm of a canary: a predictor behind the course service's checks, called by handle."""

    def __init__(self, model_path: str | None = None, version: str | None = None) -> None:
        config = ServiceConfig.from_env(model_path=model_path, model_version=version, threads=1)
        self.service = InferenceService(config)

    async def classify(self, raw: bytes, content_type: str | None, top_k: str | None) -> tuple[int, dict]:
        try:
            k = self.service.parse_top_k(top_k)
            return 200, await self.service.predict_async(raw, content_type, k)
        except ServingError as error:                    # the contract's 4xx envelope, not a Ray exception
            return error.status, error_body(error.code, error.message)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Canary:
    """Send ``share`` of the callers (by ``X-User-Id``, sticky) to the candidate arm, the rest to stable."""

    def __init__(self, stable: Any, candidate: Any, share: float = 0.2) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"share must be in [0, 1], got {share}")
        self.handles = {"stable": stable, "candidate": candidate}
        self.share = share

    def arm(self, key: str) -> str:
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8   # as lesson 09's CanaryRouter
        return "candidate" if bucket < self.share else "stable"

    def __serve_build_asgi_app__(self) -> Any:
        app = FastAPI()

        @app.exception_handler(ServingError)
        async def serving_error(request: Any, error: ServingError) -> JSONResponse:
            return JSONResponse(error_body(error.code, error.message), status_code=error.status)

        @app.post("/predict")
        async def predict(request: Request) -> JSONResponse:
            form = await request.form()
            upload = pick_upload({name: value for name, value in form.items() if not isinstance(value, str)})
            arm = self.arm(request.headers.get("X-User-Id", ""))
            status, answer = await self.handles[arm].classify.remote(await upload.read(), upload.content_type,
                                                                     request.query_params.get("top_k"))
            return JSONResponse(answer, status_code=status, headers={"X-Arm": arm})

        return app


def build_service(args: dict[str, str]) -> Any:
    """``serve run serve_app:build_service model_path=...``: the application, for the CLI or a RayService."""
    return CourseService.bind(args.get("model_path"), args.get("version"))   # None: COURSE_SERVE_* or the defaults


def build_canary(args: dict[str, str]) -> Any:
    """The canary application: ``stable`` and ``candidate`` model files (None: the checkpoint), ``share``."""
    share = float(args.get("share", "0.2"))
    stable, candidate = Arm.options(name="stable"), Arm.options(name="candidate")
    return Canary.bind(stable.bind(args.get("stable"), "stable"), candidate.bind(args.get("candidate"), "candidate"),
                       share)


service = CourseService.bind()
