"""The Flask front end: the same HTTP contract as the FastAPI one, from an app factory.

    waitress-serve --call course_utils.serving.flask_app:create_app_from_env

(or ``python -m course_utils.serving --framework flask``). Flask's own ``app.run`` is a
development server: single process, no timeouts, not meant for traffic. Waitress is a
production WSGI server that runs on Linux, macOS and Windows alike.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .images import ServingError
from .metrics import endpoint_label
from .service import API_KEY_HEADER, REQUEST_ID_HEADER, InferenceService, ServiceConfig, request_id


def error_json(status: int, code: str, message: str):
    return jsonify({"success": False, "error": {"code": code, "message": message}}), status


def create_app(config: ServiceConfig | None = None) -> Flask:
    """Build the app and load (and warm up) the model now: a WSGI app has no start-up hook."""
    config = config or ServiceConfig()
    config.framework = "flask"
    service = InferenceService(config)
    app = Flask(__name__)
    assert isinstance(app.json, DefaultJSONProvider)
    app.json.sort_keys = False        # keep the contract's key order, as FastAPI does
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes   # werkzeug answers 413 beyond this
    app.extensions["inference_service"] = service

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()
        g.request_id = request_id(request.headers.get(REQUEST_ID_HEADER))
        service.metrics.in_flight.inc()

    @app.teardown_request
    def stop_timer(_error=None) -> None:
        if "started" in g:
            service.metrics.in_flight.dec()

    @app.after_request
    def record(response):
        if "started" in g:
            seconds = time.perf_counter() - g.started
            endpoint = endpoint_label(request.path)
            service.metrics.observe(endpoint, response.status_code, seconds)
            response.headers[REQUEST_ID_HEADER] = g.request_id
            if endpoint == "/predict":
                service.log_request(g.request_id, request.method, endpoint, response.status_code, seconds * 1000,
                                    g.get("predicted_class"), g.get("error_code"))
        return response

    @app.errorhandler(ServingError)
    def serving_error(error: ServingError):
        g.error_code = error.code
        return error_json(error.status, error.code, error.message)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_error):
        return error_json(413, "payload_too_large", f"the upload is larger than the {config.max_upload_bytes:,}-byte limit")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_json(error.code or 500, codes.get(error.code or 0, "http_error"), error.description or error.name)

    @app.errorhandler(Exception)
    def unexpected(_error):  # a bug, never bad input
        app.logger.exception("unexpected error")
        return error_json(500, "internal_error", "the server failed; the error was logged")

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
        upload = request.files.get("file") or request.files.get("image")
        if upload is None:
            raise ServingError(422, "missing_file", "send the image as a multipart form field named 'file' (or 'image')")
        answer = service.predict(upload.read(), upload.mimetype, k)
        g.predicted_class = answer["predictions"][0]["class"]
        return jsonify(answer)

    return app


def create_app_from_env() -> Flask:
    """Factory for WSGI servers: options come from ``COURSE_SERVE_*`` environment variables."""
    return create_app(ServiceConfig.from_env())
