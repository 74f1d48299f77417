"""A small closed-loop load generator: N concurrent clients, each sending requests back to back.

Good enough to compare server configurations on one machine (lessons 06 and 08 and `make bench`);
for real load tests use a dedicated tool (Locust, wrk, k6) on another machine. On a 2-core box the
clients share the CPU with the server, so absolute numbers are pessimistic; ratios still compare.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
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

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"clients": self.concurrency, "requests": len(self.latencies_ms), "errors": len(self.errors),
                "req_per_s": self.requests_per_s, "p50_ms": self.percentile(50), "p99_ms": self.percentile(99)}


def run_load(url: str, payloads: Sequence[tuple[bytes, str, int | None]], concurrency: int, seconds: float = 2.0,
             headers: dict[str, str] | None = None, field_name: str = "file", max_requests: int = 100_000) -> LoadResult:
    """Send ``POST url`` multipart uploads from ``concurrency`` threads for ``seconds`` (bounded).

    ``payloads`` are ``(bytes, content type, expected class or None)``; client ``i`` cycles through
    them starting at ``i``. A response that is not 200, or whose top class differs from the expected
    one, is counted as an error / mismatch.
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
                                        headers=headers, timeout=30)
                elapsed = (time.perf_counter() - t0) * 1000.0
                ok = response.status_code == 200
                top = response.json()["predictions"][0]["class"] if ok else None
            except (requests.RequestException, ValueError, KeyError) as error:
                with lock:
                    result.errors.append(type(error).__name__)
                continue
            with lock:
                if not ok:
                    result.errors.append(str(response.status_code))
                else:
                    result.latencies_ms.append(elapsed)
                    result.mismatches += int(expected is not None and top != expected)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    result.seconds = time.monotonic() - start
    return result
