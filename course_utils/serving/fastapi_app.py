"""The FastAPI front end: async endpoints, pydantic response models, the model loaded in ``lifespan``.

    uvicorn --factory course_utils.serving.fastapi_app:create_app_from_env

(or ``python -m course_utils.serving``). Blocking work (decoding, the model) never runs on the
event loop: decoding goes to a thread, inference to the dynamic batcher's thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import v2
from .contract import (
    API_KEY_HEADER,
    INTERNAL_ERROR_MESSAGE,
    REQUEST_ID_HEADER,
    ServingError,
    error_body,
    http_error_code,
    payload_too_large,
    pick_upload,
    v2_error_body,
)
from .predictor import Predictor
from .service import InferenceService, ServiceConfig


class PredictionItem(BaseModel):
    class_: int = Field(alias="class", description="class index")
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class PredictResponse(BaseModel):
    success: bool = True
    predictions: list[PredictionItem]
    model_version: str
    latency_ms: float = Field(description="server-side time to answer, in milliseconds")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. not_an_image")
    message: str = Field(description="what was wrong and what is accepted")


class ErrorResponse(BaseModel):
    success: bool = False
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "empty, corrupt, truncated or not an image",
    401: "missing or wrong API key (when the service has one)",
    413: "upload or image too large",
    415: "not an image type we accept",
    422: "bad parameters (top_k) or no file field",
    503: "overloaded: too many requests wait for the model; retry after the Retry-After header's seconds",
}.items()}
#: Most bytes read and thrown away after a too-large body, so that the client reads the 413 (see below).
DRAIN_LIMIT = 64 * 2**20


def error_response(path: str, status: int, code: str, message: str) -> JSONResponse:
    """The contract's error answer: the envelope on the course's routes, the v2 shape on ``/v2/...``."""
    body = v2_error_body(code, message) if path.startswith("/v2") else error_body(code, message)
    return JSONResponse(status_code=status, content=body)


class BodyTooLarge(Exception):
    pass


async def _drain(receive: Receive, budget: int) -> None:
    """Read and discard the rest of a request body, at most ``budget`` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    """413 for bodies over the limit: from Content-Length at once, or while a chunked body streams in.

    A client that sends its whole body before reading the answer (Python's urllib, most HTTP/1.1
    libraries without ``Expect: 100-continue``) sees a connection reset, not the answer, if the
    server answers and closes while the body is still coming. So before any answer leaves - a 413
    here, or a 400/401/422 the app gave early - the unread rest of the body is read and thrown
    away (up to :data:`DRAIN_LIMIT` bytes; never stored). A client that asked
    ``Expect: 100-continue`` (curl) gets the 413 at once and never sends the body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_limit: int = DRAIN_LIMIT) -> None:
        self.app, self.max_bytes, self.drain_limit = app, max_bytes, max(drain_limit, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        has_body = (declared is not None and declared != b"0") or b"transfer-encoding" in headers
        refusal = payload_too_large(self.max_bytes)
        answer = error_response(scope["path"], refusal.status, refusal.code, refusal.message)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue" and int(declared) <= self.drain_limit:
                await _drain(receive, int(declared))
            await answer(scope, receive, send)
            return
        seen = 0
        body_done = not has_body
        too_large = started = False

        async def counting_receive() -> Message:
            nonlocal seen, body_done, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge   # the app may turn this into its own error: it is replaced below
            else:
                body_done = True
            return message

        async def draining_send(message: Message) -> None:
            nonlocal started, body_done
            if too_large:
                return                   # the 413 below is the answer
            started = started or message["type"] == "http.response.start"
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not body_done:
                body_done = True
                await _drain(receive, self.drain_limit - seen)   # an early answer: let the client finish sending
            await send(message)

        try:
            await self.app(scope, counting_receive, draining_send)
        except BodyTooLarge:
            pass
        if too_large and not started:
            await _drain(receive, self.drain_limit - seen)
            await answer(scope, receive, send)


def create_app(config: ServiceConfig | None = None, predictor: Predictor | None = None,
               run_batch: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None) -> FastAPI:
    """Build the app; the model loads (and warms up) when the server starts, in ``lifespan``.

    ``predictor``: serve this one instead of loading ``config.model_path``. ``run_batch``: let an
    engine batch the model calls (see :class:`InferenceService`).
    """
    config = config or ServiceConfig()
    config.framework = "fastapi"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .lifecycle import install_drain

        app.state.service = InferenceService(config, predictor, run_batch)
        install_drain(app.state.service, config.drain_s)   # SIGTERM: not ready at once, then uvicorn's shutdown
        yield
        app.state.service.close()

    app = FastAPI(
        title="Image classification service",
        version="1.0",
        description="Classifies an uploaded image (by default a handwritten digit); also speaks the Open "
                    "Inference Protocol (v2) under /v2. Course: Deploying PyTorch Models.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_upload_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        service: InferenceService | None = getattr(request.app.state, "service", None)
        if service is None:
            return await call_next(request)
        record = service.begin(request.method, request.url.path, request.headers.get(REQUEST_ID_HEADER))
        request.state.record = record
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers[REQUEST_ID_HEADER] = record.request_id
            return response
        finally:
            service.finish(record, status)

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, error: ServingError) -> JSONResponse:
        record = getattr(request.state, "record", None)
        if record is not None:
            record.error_code = error.code
        response = error_response(request.url.path, error.status, error.code, error.message)
        response.headers.update(error.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_response(request.url.path, 422, "invalid_request", problems or "the request is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, error.status_code, http_error_code(error.status_code), str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:  # a bug, never bad input
        return error_response(request.url.path, 500, "internal_error", INTERNAL_ERROR_MESSAGE)

    @app.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
    async def health(request: Request) -> dict[str, object]:
        return request.app.state.service.health()

    @app.get("/ready", summary="Readiness: the model is loaded and warmed up",
             responses={503: {"description": "still loading"}})
    async def ready(request: Request) -> JSONResponse:
        status, body = request.app.state.service.readiness()
        return JSONResponse(status_code=status, content=body)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        service: InferenceService = request.app.state.service
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/predict", response_model=PredictResponse, response_model_by_alias=True, responses=ERRORS,
              summary="Classify one uploaded image")
    async def predict(
        request: Request,
        file: Annotated[UploadFile | None, File(description="the image (multipart field 'file')")] = None,
        image: Annotated[UploadFile | None, File(description="alternative field name, as the chapter's client")] = None,
        top_k: Annotated[str | None, Query(description="how many classes to return (default: the model's)")] = None,
        x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER, description="required if the service has a key")] = None,
    ) -> JSONResponse:
        service: InferenceService = request.app.state.service
        service.check_api_key(x_api_key)
        k = service.parse_top_k(top_k)
        upload = pick_upload({"file": file, "image": image})
        raw = await upload.read()
        return JSONResponse(content=await service.predict_async(raw, upload.content_type, k, request.state.record))

    # ---------------------------------------------------------------- the Open Inference Protocol (v2)
    @app.get("/v2", summary="Open Inference Protocol: server metadata", tags=["v2"])
    async def v2_server() -> dict[str, Any]:
        return v2.server_metadata()

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness", tags=["v2"])
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol: readiness", tags=["v2"])
    async def v2_ready(request: Request) -> JSONResponse:
        ready = request.app.state.service.ready
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})

    @app.get("/v2/models/{model_name}", summary="Open Inference Protocol: model metadata", tags=["v2"])
    async def v2_model(request: Request, model_name: str) -> dict[str, Any]:
        return v2.model_metadata(request.app.state.service.predictor, model_name)

    @app.get("/v2/models/{model_name}/ready", summary="Open Inference Protocol: model readiness", tags=["v2"])
    async def v2_model_ready(request: Request, model_name: str) -> JSONResponse:
        predictor = request.app.state.service.predictor
        v2.check_model(predictor, model_name)
        return JSONResponse(status_code=200 if predictor.ready else 503, content={"name": model_name,
                                                                                   "ready": predictor.ready})

    @app.post("/v2/models/{model_name}/infer", summary="Open Inference Protocol: inference", tags=["v2"],
              response_class=Response)
    async def v2_infer(
        request: Request, model_name: str,
        x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER, description="required if the service has a key")] = None,
    ) -> Response:
        service: InferenceService = request.app.state.service
        service.check_api_key(x_api_key)
        answer = await service.infer_v2_async(model_name, await request.body(), request.headers.get(v2.INFER_HEADER))
        return Response(answer.body, media_type=answer.media_type, headers=answer.headers)

    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and multi-worker runs: options come from ``COURSE_SERVE_*``."""
    from .service import configure_request_logging

    configure_request_logging()  # each worker process logs its own requests
    return create_app(ServiceConfig.from_env())
