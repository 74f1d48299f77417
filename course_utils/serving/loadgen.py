"""A small closed-loop load generator: N concurrent clients, each sending requests back to back.

Good enough to compare server configurations on one machine (lessons 06 and 08 and `make bench`);
for real load tests use a dedicated tool (Locust, wrk, k6) on another machine. On a 2-core box the
clients share the CPU with the server, so absolute numbers are pessimistic; ratios still compare.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import requests


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: int = 0
    error_times_s: list[float] = field(default_factory=list)   # seconds from the start, one per error
    actions_s: list[float] = field(default_factory=list)       # when each scheduled action ran
    tally: Counter[str] = field(default_factory=Counter)       # answers per value of ``tally_header``

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def recovery_s(self, action: int = 0) -> float:
        """Seconds from scheduled action ``action`` (a kill, say) to the last error after it; 0 if none."""
        at = self.actions_s[action]
        after = [t for t in self.error_times_s if t >= at]
        return max(after) - at if after else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"clients": self.concurrency, "requests": len(self.latencies_ms), "errors": len(self.errors),
                "req_per_s": self.requests_per_s, "p50_ms": self.percentile(50), "p99_ms": self.percentile(99)}


def run_load(url: str, payloads: Sequence[tuple[bytes, str, int | None]], concurrency: int, seconds: float = 2.0,
             headers: dict[str, str] | None = None, field_name: str = "file", max_requests: int = 100_000,
             actions: Sequence[tuple[float, Callable[[], object]]] = (), tally_header: str | None = None,
             timeout_s: float = 30.0) -> LoadResult:
    """Send ``POST url`` multipart uploads from ``concurrency`` threads for ``seconds`` (bounded).

    ``payloads`` are ``(bytes, content type, expected class or None)``; client ``i`` cycles through
    them starting at ``i``. A response that is not 200, or whose top class differs from the expected
    one, is counted as an error / mismatch; each error's time is kept (``error_times_s``).
    ``actions`` are ``(seconds after the start, callable)``: a fault to inject mid-load (kill a
    replica); :meth:`LoadResult.recovery_s` then says how long clients saw errors after it.
    ``tally_header`` counts the 200 answers by the value of that response header (which replica).
    An action that raises makes ``run_load`` raise ``RuntimeError`` with its reason, after the run.

    >>> run_load("http://127.0.0.1:9/predict", [(b"", "image/png", None)], 1, 0.2).errors[:1]
    ['ConnectionError']
    """
    if concurrency < 1 or seconds <= 0:
        raise ValueError("need concurrency >= 1 and seconds > 0")
    result = LoadResult(concurrency, seconds)
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds

    def client(index: int) -> None:
        session = requests.Session()
        i = index
        while time.monotonic() < deadline and len(result.latencies_ms) < max_requests:
            raw, content_type, expected = payloads[i % len(payloads)]
            i += 1
            t0 = time.perf_counter()
            try:
                response = session.post(url, files={field_name: ("upload", raw, content_type)},
                                        headers=headers, timeout=timeout_s)
                elapsed = (time.perf_counter() - t0) * 1000.0
                ok = response.status_code == 200
                top = response.json()["predictions"][0]["class"] if ok else None
            except (requests.RequestException, ValueError, KeyError) as error:
                with lock:
                    result.errors.append(type(error).__name__)
                    result.error_times_s.append(time.monotonic() - start)
                continue
            with lock:
                if not ok:
                    result.errors.append(str(response.status_code))
                    result.error_times_s.append(time.monotonic() - start)
                else:
                    result.latencies_ms.append(elapsed)
                    result.mismatches += int(expected is not None and top != expected)
                    if tally_header:
                        result.tally[response.headers.get(tally_header, "?")] += 1

    failures: list[str] = []

    def act(at: float, action: Callable[[], object]) -> None:
        time.sleep(max(0.0, start + at - time.monotonic()))
        result.actions_s.append(time.monotonic() - start)
        try:
            action()
        except Exception as error:   # noqa: BLE001 - reported after the run, not lost in a thread
            failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    threads += [threading.Thread(target=act, args=pair, daemon=True) for pair in sorted(actions, key=lambda a: a[0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout_s + 30)
    result.seconds = time.monotonic() - start
    if failures:
        raise RuntimeError(f"a scheduled action failed during the load: {failures[0]}")
    return result
