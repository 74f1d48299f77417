"""Faults a production service meets: slow clients and a rolling restart's SIGTERM, on both front ends.

Real servers on loopback (``python -m course_utils.serving``), bounded in time.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from course_utils import data
from course_utils.serving import serve_in_background

FRAMEWORKS = ["fastapi", "flask"]
PAYLOADS = data.sample_payloads()


def uvicorn_workers(parent) -> list:
    """The live worker processes of a uvicorn supervisor (not multiprocessing's resource tracker, not zombies)."""
    import psutil

    alive = []
    for child in parent.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.Error:   # it exited while we looked
            pass
    return alive


def wait_for_workers(server, count: int, timeout: float = 30.0):
    """Wait until ``server`` (a uvicorn supervisor) has ``count`` live workers; return a function listing them."""
    import psutil

    parent = psutil.Process(server.process.pid)
    deadline = time.monotonic() + timeout
    while len(uvicorn_workers(parent)) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return lambda: uvicorn_workers(parent)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_300_slow_clients_do_not_take_the_service_offline(framework):
    with serve_in_background(framework) as server:
        slow = []
        try:
            for _ in range(300):      # each sends half a request line and then nothing
                connection = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                connection.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
                slow.append(connection)
            time.sleep(0.5)
            raw, content_type, label = PAYLOADS[3]
            started = time.perf_counter()
            answer = requests.post(server.url + "/predict", files={"file": ("d", raw, content_type)}, timeout=10)
            seconds = time.perf_counter() - started
        finally:
            for connection in slow:
                connection.close()
    assert answer.status_code == 200 and answer.json()["predictions"][0]["class"] == label
    assert seconds < 1.0, f"a normal client waited {seconds:.2f} s behind 300 slow ones"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sigterm_finishes_every_accepted_request_and_exits_in_bounded_time(framework):
    # a 300 ms batch window: at SIGTERM the requests sit in the dynamic batcher, accepted, unanswered
    args = ["--max-batch-size", "32", "--max-wait-ms", "300", "--drain-seconds", "1", "--grace-seconds", "10"]
    with serve_in_background(framework, args=args) as server:
        results: list[tuple[int, int, int]] = []
        lock = threading.Lock()

        def client(index: int) -> None:
            raw, content_type, label = PAYLOADS[index % len(PAYLOADS)]
            answer = requests.post(server.url + "/predict", files={"file": ("d", raw, content_type)}, timeout=20)
            with lock:
                results.append((answer.status_code, answer.json()["predictions"][0]["class"], label))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for thread in clients:
            thread.start()
        time.sleep(0.1)                                  # accepted, waiting in the batcher
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        draining = requests.get(server.url + "/ready", timeout=5)          # still serving, but not ready
        late = requests.post(server.url + "/predict", files={"file": ("d", *PAYLOADS[7][:2])}, timeout=10)
        for thread in clients:
            thread.join(20)
        code = server.process.wait(timeout=15)
        seconds = time.monotonic() - started
    assert (draining.status_code, draining.json()["status"]) == (503, "draining")
    assert late.status_code == 200, "during the drain the service still answers"
    assert len(results) == 12 and all(status == 200 and top == label for status, top, label in results), results
    assert code in (0, -signal.SIGTERM) and seconds < 1 + 10, f"exit code {code} after {seconds:.1f} s"


def test_a_killed_worker_costs_nothing_to_a_client_that_retries():
    import os

    from course_utils.serving.client import post_image

    with serve_in_background("fastapi", args=["--workers", "2"]) as server:
        workers = wait_for_workers(server, 2)
        first = workers()
        assert len(first) == 2, [c.cmdline() for c in first]
        outcomes: list[tuple[bool, int]] = []
        lock = threading.Lock()
        stop = time.monotonic() + 4.0

        def client(index: int) -> None:
            session = requests.Session()
            i = index
            while time.monotonic() < stop:
                raw, content_type, label = PAYLOADS[i % len(PAYLOADS)]
                i += 1
                answer, retried = post_image(server.url + "/predict", raw, content_type, retries=4, session=session)
                with lock:
                    outcomes.append((answer.status_code == 200 and answer.json()["predictions"][0]["class"] == label,
                                     retried))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(1.5)
        os.kill(first[0].pid, signal.SIGKILL)            # a worker dies under load
        for thread in clients:
            thread.join(30)
        deadline = time.monotonic() + 15
        while (len(workers()) < 2 or first[0] in workers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = workers()
    assert outcomes and all(ok for ok, _ in outcomes), f"{sum(not ok for ok, _ in outcomes)} of {len(outcomes)} failed"
    assert len(alive) == 2 and first[0].pid not in [c.pid for c in alive], "uvicorn replaces the dead worker"


def test_the_retrying_client_never_retries_a_client_error_and_gives_up_on_a_dead_server():
    from course_utils.serving import free_port
    from course_utils.serving.client import post_image

    with serve_in_background("fastapi", args=["--api-key", "k"]) as server:
        answer, retried = post_image(server.url + "/predict", b"not an image", api_key="k")
        assert (answer.status_code, retried) == (400, 0)
        answer, retried = post_image(server.url + "/predict", PAYLOADS[7][0], api_key="wrong")
        assert (answer.status_code, retried) == (401, 0)
    started = time.perf_counter()
    with pytest.raises(requests.ConnectionError):
        post_image(f"http://127.0.0.1:{free_port()}/predict", b"x", retries=2, backoff_s=0.05)
    assert time.perf_counter() - started < 2, "backoff is bounded"


# ----------------------------------------------------------------------------- metrics across worker processes

def _predict_counts(server) -> tuple[dict[str, float], float]:
    """One scrape, on a new connection: /predict requests by status, and the latency histogram's count."""
    from course_utils import monitoring

    text = requests.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
    samples = monitoring.parse_prometheus(text)
    by_status = {row.labels["status"]: row.value for row in samples.itertuples()
                 if row.name == "inference_requests_total" and row.labels.get("endpoint") == "/predict"}
    count = [row.value for row in samples.itertuples()
             if row.name == "inference_request_latency_seconds_count" and row.labels.get("endpoint") == "/predict"]
    return by_status, sum(count)


def test_every_scrape_of_two_workers_reports_every_request_even_after_a_worker_is_killed():
    import os


    raw, content_type, _ = PAYLOADS[3]
    outcomes = {"200": (raw, {"X-API-Key": "k"}), "400": (b"not an image", {"X-API-Key": "k"}),
                "413": (b"\0" * 20_000, {"X-API-Key": "k"}), "401": (raw, {})}
    with serve_in_background("fastapi", args=["--workers", "2", "--api-key", "k", "--max-upload-mb", "0.01"]) as server:
        workers = wait_for_workers(server, 2)
        sent = {"200": 40, "400": 10, "413": 5, "401": 5}
        for status, times in sent.items():
            body, headers = outcomes[status]
            for _ in range(times):   # a new connection each: the kernel spreads them over both workers
                answer = requests.post(server.url + "/predict", files={"file": ("d.png", body, content_type)},
                                       headers={**headers, "Connection": "close"}, timeout=10)
                assert str(answer.status_code) == status, answer.text
        expected = {status: float(times) for status, times in sent.items()}
        scrapes = [_predict_counts(server) for _ in range(6)]
        assert all(scrape == (expected, 60.0) for scrape in scrapes), scrapes
        first = workers()
        os.kill(first[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (len(workers()) < 2 or first[0] in workers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        after = [_predict_counts(server) for _ in range(4)]
    assert all(scrape == (expected, 60.0) for scrape in after), f"counters went backwards after a restart: {after}"


def test_a_dead_workers_counts_stay_and_its_in_flight_requests_go(tmp_path):
    """Multiprocess mode, unit level: a worker that dies (no clean-up at all) leaves its counters, not its gauge."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dying = ("import os; from course_utils.serving.metrics import ServiceMetrics; m = ServiceMetrics('v1', 'fastapi'); "
             "m.observe('/predict', 200, 0.01); m.observe('/predict', 200, 0.02); m.in_flight.inc(3); os._exit(0)")
    subprocess.run([sys.executable, "-c", dying], env=env, check=True, timeout=60)
    scrape = ("from course_utils.serving.metrics import ServiceMetrics; m = ServiceMetrics('v1', 'fastapi'); "
              "m.observe('/predict', 400, 0.01); print(m.render().decode())")
    text = subprocess.run([sys.executable, "-c", scrape], env=env, check=True, timeout=60, capture_output=True,
                          text=True).stdout
    assert 'inference_requests_total{endpoint="/predict",status="200"} 2.0' in text
    assert 'inference_requests_total{endpoint="/predict",status="400"} 1.0' in text
    assert 'inference_request_latency_seconds_count{endpoint="/predict"} 3.0' in text
    assert "inference_in_flight_requests 0.0" in text, "the dead worker's in-flight requests are not counted"
    assert 'inference_model_info{framework="fastapi",model_version="v1"} 1.0' in text


def test_a_chosen_metrics_directory_is_emptied_even_for_one_worker(tmp_path, monkeypatch):
    from course_utils.serving.metrics import MULTIPROCESS_ENV, multiprocess_metrics

    (tmp_path / "counter_123.db").write_bytes(b"old run")
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    with multiprocess_metrics(1) as folder:
        assert folder == str(tmp_path) and not list(tmp_path.glob("*.db")), "a previous run's values would add up"
    assert tmp_path.is_dir(), "the operator's directory is kept"
    monkeypatch.delenv(MULTIPROCESS_ENV)
    with multiprocess_metrics(2) as fresh:
        assert fresh is not None and Path(fresh).is_dir()
    assert not Path(fresh).exists(), "a directory the CLI made is removed at exit"


# ----------------------------------------------------------------------------- overload: shed, do not queue forever

@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_burst_past_the_queue_is_shed_with_503_and_retry_after_and_the_service_recovers(framework):
    import numpy as np

    from course_utils.serving import Predictor, ServiceConfig, serve_asgi_in_thread, serve_wsgi_in_thread

    def slow_model(x: np.ndarray) -> np.ndarray:   # 150 ms per model call, whatever the batch
        time.sleep(0.15)
        return np.zeros((len(x), 10), dtype=np.float32)

    predictor = Predictor(slow_model, "slow", "slow-v1", takes_arrays=True)
    config = ServiceConfig(max_batch_size=2, max_queue=2, framework=framework)
    if framework == "fastapi":
        from course_utils.serving.fastapi_app import create_app
        serving = serve_asgi_in_thread(create_app(config, predictor=predictor))
    else:
        from course_utils.serving.flask_app import create_app
        serving = serve_wsgi_in_thread(create_app(config, predictor=predictor))
    raw, content_type, _ = PAYLOADS[0]
    with serving as server:
        def one(_: int) -> requests.Response:
            return requests.post(server.url + "/predict", files={"file": ("d", raw, content_type)}, timeout=30)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        shed = [a for a in answers if a.status_code == 503]
        after = one(0)
        metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert {a.status_code for a in answers} <= {200, 503}, [a.status_code for a in answers]
    assert shed and len(shed) < 16, "a burst past the queue is partly shed, partly served"
    assert all(a.headers["Retry-After"] == "1" and a.json()["error"]["code"] == "overloaded" for a in shed)
    assert "at capacity" in shed[0].json()["error"]["message"]
    assert after.status_code == 200, "once the burst is over the service answers again"
    assert f'status="503"}} {float(len(shed))}' in metrics


def test_the_batcher_admits_all_of_a_request_or_none():
    import numpy as np

    from course_utils.serving.batching import BatcherFull, DynamicBatcher

    release, taken = threading.Event(), threading.Event()
    batcher = DynamicBatcher(lambda x: (taken.set(), release.wait(5), x)[2], max_batch_size=1, max_queue=3)
    try:
        first = batcher.submit(np.zeros(1))       # taken by the worker, which then blocks
        assert taken.wait(5)
        batcher.submit_all([np.zeros(1)] * 3)     # fills the queue exactly
        with pytest.raises(BatcherFull, match="3 inputs waiting for the model, at most 3"):
            batcher.submit(np.zeros(1))
        assert batcher.waiting == 3, "a refused request queued nothing"
        release.set()
        first.result(timeout=5)
    finally:
        release.set()
        batcher.close()
    with pytest.raises(ValueError, match="max_queue"):
        DynamicBatcher(lambda x: x, max_queue=-1)
    roomy = DynamicBatcher(lambda x: x, max_batch_size=8, max_queue=2)
    try:   # a request larger than the whole queue is served when the queue is empty, not refused forever
        assert len([f.result(timeout=5) for f in roomy.submit_all([np.zeros(1)] * 5)]) == 5
    finally:
        roomy.close()
    with pytest.raises(RuntimeError, match="closed"):
        roomy.submit(np.zeros(1))


def test_the_client_waits_as_long_as_retry_after_says():
    from course_utils.serving.client import _retry_after

    class Answer:
        def __init__(self, value):
            self.headers = {} if value is None else {"Retry-After": value}

    assert [_retry_after(Answer(v)) for v in ("2", "0.5", None, "Wed, 21 Oct 2026 07:28:00 GMT", "999", "-3", "nan",
                                              "inf")] == [2.0, 0.5, 0.0, 0.0, 30.0, 0.0, 0.0, 0.0]


def test_an_answer_cut_off_by_a_dying_worker_is_retried():
    from course_utils.serving.client import post_image

    class Flaky:   # the first answer breaks off mid-body, as when a worker is SIGKILLed while it writes
        calls = 0

        def post(self, *args, **kwargs):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead")
            answer = requests.Response()
            answer.status_code = 200
            return answer

    answer, retried = post_image("http://127.0.0.1:9/predict", b"png", session=Flaky(), backoff_s=0.001)
    assert answer.status_code == 200 and retried == 1
