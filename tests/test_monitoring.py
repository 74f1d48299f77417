import io
import json
import math

import numpy as np
import pytest
import torch

from course_utils import data, models, monitoring
from course_utils.serving import ServiceConfig
from course_utils.serving.contract import request_id
from course_utils.serving.metrics import ServiceMetrics
from course_utils.serving.service import configure_request_logging


def test_latency_monitor_excludes_warmup_and_keeps_a_window():
    monitor = monitoring.LatencyMonitor(window=5, warmup=3)
    for ms in [100, 100, 100, 1, 2, 3, 4, 5, 6, 7]:
        monitor.record(ms)
    assert monitor.count == 7 and list(monitor.samples) == [3, 4, 5, 6, 7]
    assert monitor.percentiles() == {"p50": 5.0, "p95": pytest.approx(6.8), "p99": pytest.approx(6.96)}
    report = monitor.report()
    assert report["count"] == 5 and report["max_ms"] == 7 and report["mean_ms"] == 5
    with pytest.raises(ValueError, match="no measurements"):
        monitoring.LatencyMonitor(warmup=1).percentiles()
    with pytest.raises(ValueError):
        monitoring.LatencyMonitor(window=0)


def test_latency_monitor_runs_under_inference_mode():
    monitor = monitoring.LatencyMonitor(warmup=0)
    out = monitor.run(lambda x: torch.is_inference_mode_enabled(), torch.zeros(1))
    assert out is True and monitor.count == 1


def test_prometheus_parsing_and_histogram_quantiles():
    metrics = ServiceMetrics("v1", "fastapi")
    for seconds in [0.002] * 90 + [0.2] * 10:
        metrics.observe("/predict", 200, seconds)
    metrics.observe("/predict", 400, 0.001)
    samples = monitoring.parse_prometheus(metrics.render().decode())
    assert monitoring.metric_sum(samples, "inference_requests_total", endpoint="/predict") == 101
    assert monitoring.metric_sum(samples, "inference_requests_total", status="400") == 1
    assert monitoring.metric_sum(samples, "inference_requests_total", status="503") == 0
    fresh = monitoring.parse_prometheus(ServiceMetrics("v1", "fastapi").render().decode())
    assert monitoring.metric_sum(fresh, "inference_requests_total", endpoint="/predict") == 0, \
        "a worker that has not answered /predict yet has no such series: 0, not an error"
    buckets = monitoring.histogram_buckets(samples, "inference_request_latency_seconds", endpoint="/predict")
    assert buckets[math.inf] == 101
    assert 0.001 <= monitoring.histogram_quantile(0.5, buckets) <= 0.0025
    assert 0.1 <= monitoring.histogram_quantile(0.99, buckets) <= 0.25
    assert monitoring.histogram_quantile(0.5, {0.1: 10, 0.2: 30, math.inf: 40}) == pytest.approx(0.15)
    assert math.isnan(monitoring.histogram_quantile(0.5, {1.0: 0, math.inf: 0}))
    with pytest.raises(ValueError):
        monitoring.histogram_quantile(1.5, buckets)


def test_psi_is_small_for_same_and_large_for_shifted():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=4000)
    assert monitoring.psi(reference, rng.normal(size=4000)) < 0.05
    assert monitoring.psi(reference, rng.normal(loc=1.0, size=4000)) > 0.2
    assert monitoring.psi_from_counts([50, 50], [50, 50]) == pytest.approx(0)
    assert monitoring.psi_from_counts([50, 50], [95, 5]) > 0.2


@pytest.fixture(scope="module")
def detector_and_model():
    model = models.load_trained_cnn()
    x, _ = data.split_tensors("test")
    with torch.inference_mode():
        predicted = model(x).argmax(1)
    return monitoring.DriftDetector.fit(x, predicted), model


def _predict(model, x):
    with torch.inference_mode():
        return model(x).argmax(1)


def test_drift_detector_is_silent_on_in_distribution_traffic(detector_and_model):
    detector, model = detector_and_model
    x, _ = data.split_tensors("val")
    report = detector.check(x, _predict(model, x))
    assert not report.drifted, report.checks
    assert report.window == len(x)


def test_drift_detector_alarms_on_shifted_inputs_and_skewed_classes(detector_and_model):
    detector, model = detector_and_model
    x, y = data.split_tensors("val")
    ink = x * data.DIGITS_STD + data.DIGITS_MEAN
    faint = data.normalize_ink(ink * 0.5)                    # half the ink: a faint pen or a bad scanner
    report = detector.check(faint, _predict(model, faint))
    assert report.checks.loc["input: ink mean", "alarm"], report.checks
    ones = x[y == 1].repeat(4, 1, 1, 1)                      # a flood of a single class
    skewed = detector.check(ones, _predict(model, ones))
    assert skewed.checks.loc["predicted classes", "alarm"] and skewed.drifted


def test_request_log_is_one_json_line_without_secrets():
    from fastapi.testclient import TestClient

    from course_utils.serving.fastapi_app import create_app

    stream = io.StringIO()
    configure_request_logging(stream)
    sample = (data.DATA_DIR / "samples" / "digit_7.png").read_bytes()
    with TestClient(create_app(ServiceConfig(api_key="top-secret", max_batch_size=1))) as client:
        ok = client.post("/predict", files={"file": ("d.png", sample, "image/png")},
                         headers={"X-API-Key": "top-secret", "X-Request-ID": "abc-123"})
        bad = client.post("/predict", files={"file": ("d.png", b"", "image/png")}, headers={"X-API-Key": "top-secret"})
        client.get("/health")
    assert ok.headers["X-Request-ID"] == "abc-123" and len(bad.headers["X-Request-ID"]) == 32
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2, "one line per /predict request, none for /health"
    assert lines[0]["request_id"] == "abc-123" and lines[0]["status"] == 200 and lines[0]["predicted_class"] == 7
    assert lines[1]["status"] == 400 and lines[1]["error_code"] == "empty_file"
    assert {"time", "model_version", "latency_ms", "path"} <= set(lines[0])
    assert "top-secret" not in stream.getvalue()
    assert request_id("evil\nline") != "evil\nline" and request_id("ok-1") == "ok-1"


def test_alert_rules_parse_and_use_exported_metrics():
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    rules = yaml.safe_load((root / "deploy" / "monitoring" / "alerts.yml").read_text())
    metrics = ServiceMetrics("v", "fastapi")
    metrics.observe("/predict", 200, 0.01)        # labelled metrics appear once they have a sample
    metrics.batch_size.observe(1)
    exported = set(monitoring.parse_prometheus(metrics.render().decode()).name)
    exported |= {n + suffix for n in exported for suffix in ("_bucket", "_count", "_sum")}
    names = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert {"InferenceLatencyP99High", "InferenceErrorRateHigh"} <= set(names)
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"]
            for metric in re.findall(r"inference_[a-z_]+", rule["expr"]):
                assert metric in exported or metric + "_total" in exported, (rule["alert"], metric)


def test_locustfile_defines_a_user_with_every_sample():
    # In a child process: importing locust monkey-patches the interpreter with gevent.
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "deploy" / "monitoring" / "locustfile.py"
    code = (f"import importlib.util, json; spec = importlib.util.spec_from_file_location('lf', r'{path}'); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(json.dumps([len(m.FILES), sorted({f[-1] for f in m.FILES}), m.ImageClient.wait_time(None)]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    count, labels, wait = json.loads(result.stdout.strip().splitlines()[-1])
    assert count == len(data.sample_images()) and labels == list(range(10)) and wait == 0
