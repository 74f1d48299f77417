"""The FastAPI front end: async endpoints, pydantic response models, the model loaded in ``lifespan``.

    uvicorn --factory course_utils.serving.fastapi_app:create_app_from_env

(or ``python -m course_utils.serving``). Blocking work (decoding, the model) never runs on the
event loop: decoding goes to a thread, inference to the dynamic batcher's thread.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, File, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .images import ServingError
from .metrics import endpoint_label
from .service import API_KEY_HEADER, REQUEST_ID_HEADER, InferenceService, ServiceConfig, request_id


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
}.items()}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"success": False, "error": {"code": code, "message": message}})


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over the limit: from Content-Length at once, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        limit_message = f"the upload is larger than the {self.max_bytes:,}-byte limit"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, "payload_too_large", limit_message)(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await error_response(413, "payload_too_large", limit_message)(scope, receive, send)


def create_app(config: ServiceConfig | None = None) -> FastAPI:
    """Build the app; the model loads (and warms up) when the server starts, in ``lifespan``."""
    config = config or ServiceConfig()
    config.framework = "fastapi"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.service = InferenceService(config)
        yield
        app.state.service.close()

    app = FastAPI(
        title="Digits inference service",
        version="1.0",
        description="Classifies an image of a handwritten digit. Course: Deploying PyTorch Models.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_upload_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        service: InferenceService | None = getattr(request.app.state, "service", None)
        if service is None:
            return await call_next(request)
        endpoint = endpoint_label(request.url.path)
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        request.state.request_id = rid
        service.metrics.in_flight.inc()
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers[REQUEST_ID_HEADER] = rid
            return response
        finally:
            seconds = time.perf_counter() - started
            service.metrics.in_flight.dec()
            service.metrics.observe(endpoint, status, seconds)
            if endpoint == "/predict":
                service.log_request(rid, request.method, endpoint, status, seconds * 1000,
                                    getattr(request.state, "predicted_class", None),
                                    getattr(request.state, "error_code", None))

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, error: ServingError) -> JSONResponse:
        request.state.error_code = error.code
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_response(422, "invalid_request", problems or "the request is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:  # a bug, never bad input
        return error_response(500, "internal_error", "the server failed; the error was logged")

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
        top_k: Annotated[str | None, Query(description="how many classes to return, 1-10")] = None,
        x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER, description="required if the service has a key")] = None,
    ) -> JSONResponse:
        service: InferenceService = request.app.state.service
        service.check_api_key(x_api_key)
        k = service.parse_top_k(top_k)
        upload = file if file is not None else image
        if upload is None:
            raise ServingError(422, "missing_file", "send the image as a multipart form field named 'file' (or 'image')")
        raw = await upload.read()
        answer = await service.predict_async(raw, upload.content_type, k)
        request.state.predicted_class = answer["predictions"][0]["class"]
        return JSONResponse(content=answer)

    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and multi-worker runs: options come from ``COURSE_SERVE_*``."""
    from .service import configure_request_logging

    configure_request_logging()  # each worker process logs its own requests
    return create_app(ServiceConfig.from_env())
