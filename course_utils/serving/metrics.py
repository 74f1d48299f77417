"""Prometheus metrics of the inference service, on a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
REQUESTS_METRIC = "inference_requests_total"


class ServiceMetrics:
    """Request counts by endpoint and status, a latency histogram, batch sizes, in-flight requests."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_version: str, framework: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(REQUESTS_METRIC, "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("inference_request_latency_seconds", "Time to answer a request, in seconds",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("inference_batch_size", "Images per model call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("inference_in_flight_requests", "Requests being answered now", registry=self.registry)
        self.info = Gauge("inference_model_info", "The model being served (value is always 1)",
                          ["model_version", "framework"], registry=self.registry)
        self.info.labels(model_version=model_version, framework=framework).set(1)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


KNOWN_ENDPOINTS = ("/predict", "/health", "/ready", "/metrics", "/docs", "/openapi.json",
                   "/v2", "/v2/health/live", "/v2/health/ready")


def endpoint_label(path: str) -> str:
    """Bound the label's cardinality: unknown paths (scanners, typos) share one label.

    >>> endpoint_label("/v2/models/digits/infer"), endpoint_label("/wp-admin")
    ('/v2/models/{name}/infer', 'other')
    """
    if path in KNOWN_ENDPOINTS:
        return path
    parts = path.split("/")
    if len(parts) == 4 and parts[1:3] == ["v2", "models"] and parts[3]:
        return "/v2/models/{name}"
    if len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[3] and parts[4] in ("ready", "infer"):
        return "/v2/models/{name}/" + parts[4]
    return "other"
