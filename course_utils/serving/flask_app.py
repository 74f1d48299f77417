"""The Flask front end: the same HTTP contract as the FastAPI one, from an app factory.

    waitress-serve --call course_utils.serving.flask_app:create_app_from_env

(or ``python -m course_utils.serving --framework flask``). Flask's own ``app.run`` is a
development server: single process, no timeouts, not meant for traffic. Waitress is a
production WSGI server that runs on Linux, macOS and Windows alike.
"""

from __future__ import annotations

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

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
from .service import InferenceService, ServiceConfig, configure_request_logging


def error_json(status: int, code: str, message: str):
    """The contract's error answer: the envelope on the course's routes, the v2 shape on ``/v2/...``."""
    body = v2_error_body(code, message) if request.path.startswith("/v2") else error_body(code, message)
    return jsonify(body), status


def create_app(config: ServiceConfig | None = None, predictor: Predictor | None = None) -> Flask:
    """Build the app and load (and warm up) the model now: a WSGI app has no start-up hook.

    ``predictor``: serve this one instead of loading ``config.model_path``.
    """
    config = config or ServiceConfig()
    config.framework = "flask"
    service = InferenceService(config, predictor)
    app = Flask(__name__)
    assert isinstance(app.json, DefaultJSONProvider)
    app.json.sort_keys = False        # keep the contract's key order, as FastAPI does
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes   # werkzeug answers 413 beyond this
    app.extensions["inference_service"] = service

    @app.before_request
    def start() -> None:
        g.record = service.begin(request.method, request.path, request.headers.get(REQUEST_ID_HEADER))

    @app.after_request
    def record(response):
        if "record" in g:
            response.headers[REQUEST_ID_HEADER] = g.record.request_id
            service.finish(g.record, response.status_code)
        return response

    @app.teardown_request
    def never_lost(_error=None) -> None:   # an answer that failed after the view still leaves the gauge right
        if "record" in g:
            service.finish(g.record, 500)

    @app.errorhandler(ServingError)
    def serving_error(error: ServingError):
        if "record" in g:
            g.record.error_code = error.code
        body, status = error_json(error.status, error.code, error.message)
        return body, status, error.headers

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_error):
        refusal = payload_too_large(config.max_upload_bytes)
        return error_json(refusal.status, refusal.code, refusal.message)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        status = error.code or 500
        return error_json(status, http_error_code(status), error.description or error.name)

    @app.errorhandler(Exception)
    def unexpected(_error):  # a bug, never bad input
        app.logger.exception("unexpected error")
        return error_json(500, "internal_error", INTERNAL_ERROR_MESSAGE)

    @app.get("/health")
    def health():
        return jsonify(service.health())

    @app.get("/ready")
    def ready():
        status, body = service.readiness()
        return jsonify(body), status

    @app.get("/metrics")
    def metrics():
        return Response(service.metrics.render(), mimetype=service.metrics.content_type)

    @app.post("/predict")
    def predict():
        service.check_api_key(request.headers.get(API_KEY_HEADER))
        k = service.parse_top_k(request.args.get("top_k"))
        upload = pick_upload(request.files)
        return jsonify(service.predict(upload.read(), upload.mimetype, k, g.record))

    # ---------------------------------------------------------------- the Open Inference Protocol (v2)
    @app.get("/v2")
    def v2_server():
        return jsonify(v2.server_metadata())

    @app.get("/v2/health/live")
    def v2_live():
        return jsonify({"live": True})

    @app.get("/v2/health/ready")
    def v2_ready():
        return jsonify({"ready": service.ready}), 200 if service.ready else 503

    @app.get("/v2/models/<model_name>")
    def v2_model(model_name: str):
        return jsonify(v2.model_metadata(service.predictor, model_name))

    @app.get("/v2/models/<model_name>/ready")
    def v2_model_ready(model_name: str):
        v2.check_model(service.predictor, model_name)
        ready = service.predictor.ready
        return jsonify({"name": model_name, "ready": ready}), 200 if ready else 503

    @app.post("/v2/models/<model_name>/infer")
    def v2_infer(model_name: str):
        service.check_api_key(request.headers.get(API_KEY_HEADER))
        answer = service.infer_v2(model_name, request.get_data(cache=False), request.headers.get(v2.INFER_HEADER))
        return Response(answer.body, mimetype=answer.media_type, headers=answer.headers)

    return app


def create_app_from_env() -> Flask:
    """Factory for WSGI servers (``waitress-serve --call``): options come from ``COURSE_SERVE_*``.

    Sets up the JSON request log on stderr, as the FastAPI factory and the CLI do.
    """
    configure_request_logging()
    return create_app(ServiceConfig.from_env())
