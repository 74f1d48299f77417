"""Prometheus metrics of the inference service, on a registry of its own (one per app), true with N workers.

With one process (Flask and waitress, or uvicorn with one worker) the metrics live in memory. With
``--workers N`` each uvicorn worker is its own process, and a scrape reaches one of them: without
help it would report that worker's share only, and two scrapes in a row would disagree (counters
that seem to go down, which Prometheus's ``rate()`` reads as restarts). So the CLI runs the workers
in prometheus_client's **multiprocess mode** (:func:`multiprocess_metrics`): every worker writes its
values to files in one fresh directory, and any worker's ``/metrics`` sums them all.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
REQUESTS_METRIC = "inference_requests_total"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def multiprocess_dir() -> str | None:
    """The directory this process writes its metrics to, or None when they live in memory.

    prometheus_client picks the mode once, when it is first imported: the variable must be set
    before that (the CLI sets it before uvicorn starts the workers).
    """
    if _values.ValueClass is _values.MutexValue:
        return None
    return os.environ.get(MULTIPROCESS_ENV)


@contextmanager
def multiprocess_metrics(workers: int) -> Iterator[str | None]:
    """Around a server with ``workers`` processes: a fresh, private metrics directory, removed at exit.

    A directory the operator chose in ``$PROMETHEUS_MULTIPROC_DIR`` is used instead, emptied of old
    ``.db`` files first (values left by a previous run would be added to this one's) and kept.
    """
    chosen = os.environ.get(MULTIPROCESS_ENV)
    if workers <= 1 and not chosen:
        yield None
        return
    folder = Path(chosen) if chosen else Path(tempfile.mkdtemp(prefix="course-serving-metrics-"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.db"):   # even with one worker: the mode is on whenever the variable is set
        old.unlink(missing_ok=True)
    os.environ[MULTIPROCESS_ENV] = str(folder)
    try:
        yield str(folder)
    finally:
        if chosen:
            os.environ[MULTIPROCESS_ENV] = chosen
        else:
            os.environ.pop(MULTIPROCESS_ENV, None)
            shutil.rmtree(folder, ignore_errors=True)


def _forget_dead_workers(folder: str) -> None:
    """Drop the live gauges (in-flight requests) of workers that are gone, even by SIGKILL.

    Counters and histograms of a dead worker are kept: what it counted did happen, and a total
    that dropped when a worker is replaced would look like a reset to Prometheus.
    """
    for path in Path(folder).glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:   # what prometheus_client's mark_process_dead does, safe for two scrapes at once
            path.unlink(missing_ok=True)
        except PermissionError:
            pass   # alive, under another user


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
        # with N workers: the sum over the live workers, and the model of any of them
        self.in_flight = Gauge("inference_in_flight_requests", "Requests being answered now", registry=self.registry,
                               multiprocess_mode="livesum")
        self.info = Gauge("inference_model_info", "The model being served (value is always 1)",
                          ["model_version", "framework"], registry=self.registry, multiprocess_mode="max")
        self.info.labels(model_version=model_version, framework=framework).set(1)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text: this process's metrics, or every worker's summed (multiprocess mode)."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        _forget_dead_workers(folder)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=folder)
        return generate_latest(merged)


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
