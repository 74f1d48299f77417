"""The production-ready inference wrapper and the chapter's checklist, made real.

* :class:`ProductionModel` - the chapter's wrapper done right: device choice, warm-up, fp16 on CUDA
  **with input casting**, input validation, top-k, batches, latency metrics, logging that emits.
* :class:`ModelRegistry` (from :mod:`course_utils.registry`) - a small file-based registry that
  several processes can share: versions with metadata and sha256, promote, roll back, and a hash
  check before anything is loaded.
* :class:`CanaryRouter` - sticky traffic splitting between a stable and a candidate model, and a
  shadow mode; :func:`two_proportion_test` to decide honestly.
* :func:`run_checklist` - inspect a model artifact and a running service, item by item.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import data, env
from .monitoring import LatencyMonitor
from .registry import CorruptRegistryError, IntegrityError, ModelRegistry, RegistryBusyError, RegistryError  # noqa: F401 - re-exported: lessons and old code import them from here
from .serving.contract import API_KEY_HEADER
from .serving.metrics import REQUESTS_METRIC
from .serving.predictor import Predictor
from .serving.spec import ModelSpec

LOG = logging.getLogger("course_utils.production")


class ProductionModel(Predictor):
    """Wrap an ``nn.Module`` for serving: a :class:`~course_utils.serving.Predictor` with guard rails.

    It *is* a Predictor - the same four stages (decode, preprocess, predict, encode), so the
    course's service, the canary router and LitServe serve it as they serve a loaded file - plus
    what the chapter's wrapper wanted: fp16 on CUDA **with input casting**, input validation that
    says what it expected, a latency window, a count of rejected inputs, and logs that appear.

    >>> pm = ProductionModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), device="cpu")
    >>> len(pm.classify_batch(torch.zeros(2, 1, 8, 8), top_k=2)), pm.dtype
    (2, torch.float32)
    """

    def __init__(self, model: nn.Module, device: str | torch.device | None = None, half: bool | None = None,
                 spec: ModelSpec | None = None, version: str = "unversioned", warmup: int = 3) -> None:
        device = env.pick_device(device) if not isinstance(device, torch.device) else device
        low = env.reduced_precision(device)
        use_half = (device.type == "cuda") if half is None else half
        dtype = low if (use_half and low is not None) else torch.float32
        self.model = model.eval().to(device=device, dtype=dtype)
        super().__init__(self.model, "eager", version, device, spec, dtype)
        self.errors = 0
        self.monitor = LatencyMonitor(window=1000, warmup=0)
        if warmup:
            self.warmup((1,) * warmup)
        LOG.info("model %s ready on %s (%s)", version, self.device, str(self.dtype).replace("torch.", ""))

    def predict_array(self, batch: Any) -> np.ndarray:
        """Class probabilities, timed; a bad batch is counted, logged and refused with a ``ValueError``.

        (``predict``, ``classify`` and the service all come through here.)
        """
        try:
            x = self.check_batch(batch)
        except ValueError:
            self.errors += 1
            LOG.warning("rejected a batch: invalid input")
            raise
        if not self.ready:             # warm-up calls are not traffic: not timed, not logged
            return super().predict_array(x)
        probabilities = self.monitor.run(super().predict_array, x)
        LOG.info("predicted a batch of %d in %.2f ms", len(x), self.monitor.samples[-1])
        return probabilities

    def stats(self) -> dict[str, float]:
        """Latency over the recent calls (see LatencyMonitor.report) and the count of rejected inputs."""
        if not self.monitor.samples:
            return {"count": 0, "errors": self.errors}
        return {**self.monitor.report(), "errors": self.errors}


# ----------------------------------------------------------------------------- canary and A/B

def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """Difference in success rate (b - a) and the two-sided p-value of a pooled z-test.

    >>> diff, p = two_proportion_test(90, 100, 90, 100); round(diff, 3), round(p, 3)
    (0.0, 1.0)
    """
    from scipy import stats

    if min(n_a, n_b) <= 0:
        raise ValueError("both groups need at least one observation")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return p_b - p_a, 1.0
    z = (p_b - p_a) / se
    return p_b - p_a, float(2 * stats.norm.sf(abs(z)))


@dataclass
class ArmStats:
    requests: int = 0
    correct: int = 0
    labelled: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class CanaryRouter:
    """Send a share of traffic to a candidate model, sticky by request key; or shadow it.

    ``route(key)`` hashes the key (a user or session id) so the same caller always sees the same
    model. In ``shadow`` mode every request is answered by the stable model while the candidate
    also runs on it, and only agreement and latency are recorded.
    """

    def __init__(self, stable: Predictor, candidate: Predictor, share: float = 0.1, shadow: bool = False) -> None:
        if not 0 <= share <= 1:
            raise ValueError("share must be in [0, 1]")
        self.models = {"stable": stable, "candidate": candidate}
        self.share, self.shadow = share, shadow
        self.arms = {"stable": ArmStats(), "candidate": ArmStats()}
        self.shadow_agreements = 0
        self.shadow_runs = 0

    def route(self, key: str) -> str:
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
        return "candidate" if (not self.shadow and bucket < self.share) else "stable"

    def _run(self, arm: str, x: torch.Tensor | bytes) -> tuple[int, float]:
        start = time.perf_counter()
        top = self.models[arm].classify(x, top_k=1)[0].index
        return top, (time.perf_counter() - start) * 1000

    def predict(self, key: str, x: torch.Tensor | bytes, label: int | None = None) -> tuple[str, int]:
        """Answer one request (a preprocessed input or upload bytes) for caller ``key``: (arm, class)."""
        arm = self.route(key)
        answer, ms = self._run(arm, x)
        stats = self.arms[arm]
        stats.requests += 1
        stats.latencies_ms.append(ms)
        if label is not None:
            stats.labelled += 1
            stats.correct += int(answer == label)
        if self.shadow:
            shadow_answer, shadow_ms = self._run("candidate", x)
            shadow = self.arms["candidate"]
            shadow.requests += 1
            shadow.latencies_ms.append(shadow_ms)
            if label is not None:
                shadow.labelled += 1
                shadow.correct += int(shadow_answer == label)
            self.shadow_runs += 1
            self.shadow_agreements += int(shadow_answer == answer)
        return arm, answer

    def report(self) -> pd.DataFrame:
        rows = {arm: {"requests": s.requests, "accuracy": (s.correct / s.labelled) if s.labelled else float("nan"),
                      "p50_ms": float(np.median(s.latencies_ms)) if s.latencies_ms else float("nan")}
                for arm, s in self.arms.items()}
        return pd.DataFrame(rows).T


# ----------------------------------------------------------------------------- the checklist

def run_checklist(model_path: str | Path, service_url: str, api_key: str | None = None,
                  drift_detector: Any = None, measured_latency: dict[str, float] | None = None,
                  latency_requests: int = 100) -> pd.DataFrame:
    """Check the chapter's best-practice items against a model artifact and a running service.

    Latency is measured here, on the service itself: ``latency_requests`` sequential uploads, timed
    by the client (``measured_latency``, e.g. from a load test, is shown beside it).
    """
    import requests

    path = Path(model_path)
    rows: list[dict[str, object]] = []

    def item(name: str, passed: bool, evidence: str) -> None:
        rows.append({"item": name, "passed": bool(passed), "evidence": evidence})

    exported = path.suffix in (".onnx", ".pt2") or (path.suffix in (".pt", ".pth") and _is_zip_with(path, "code/"))
    item("exported to a deployable format", exported, f"{path.name} ({path.suffix or 'no suffix'})")
    if path.suffix == ".onnx":
        import onnx

        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        quantized = bool(ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"})
        item("quantized", quantized, "int8 nodes: " + (", ".join(sorted(ops & {"QuantizeLinear", "QLinearConv",
                                                                               "ConvInteger"})) or "none"))
    else:
        item("quantized", False, "not an ONNX int8 graph")
    def get(route: str, **kwargs: Any) -> Any:
        try:
            return requests.get(service_url + route, timeout=5, **kwargs)
        except requests.RequestException as error:
            return error

    health, ready = get("/health"), get("/ready")
    health_status = getattr(health, "status_code", health)
    item("health check answers", health_status == 200, f"GET /health -> {health_status}")
    ready_ok = getattr(ready, "status_code", None) == 200
    info = ready.json() if ready_ok else {}
    item("ready after warm-up", ready_ok and info.get("status") == "ready", f"GET /ready -> {info.get('status')}")
    item("model version set", bool(info.get("model_version")), f"model_version={info.get('model_version')}")
    sample = (data.DATA_DIR / "samples" / "digit_7.png").read_bytes()
    no_key = requests.post(service_url + "/predict", files={"file": ("d.png", sample, "image/png")}, timeout=10)
    item("authentication on", no_key.status_code == 401, f"POST /predict without a key -> {no_key.status_code}")
    headers = {API_KEY_HEADER: api_key} if api_key else {}
    timings, statuses = [], set()
    with requests.Session() as session:
        for _ in range(latency_requests):
            started = time.perf_counter()
            answer = session.post(service_url + "/predict", files={"file": ("d.png", sample, "image/png")},
                                  headers=headers, timeout=10)
            timings.append((time.perf_counter() - started) * 1000)
            statuses.add(answer.status_code)
    evidence = (f"p50 {np.percentile(timings, 50):.1f} ms, p99 {np.percentile(timings, 99):.1f} ms over "
                f"{latency_requests} requests to POST /predict" if timings else "no requests sent")
    if measured_latency:
        evidence += " | given: " + json.dumps({k: round(v, 2) for k, v in measured_latency.items()})
    item("latency measured", latency_requests >= 100 and statuses == {200}, evidence)   # 100: a p99 is not a max
    limit = info.get("limits", {}).get("max_upload_bytes")
    if limit:
        huge = requests.post(service_url + "/predict", files={"file": ("big.png", b"0" * (limit + 2**20), "image/png")},
                             headers=headers, timeout=30)
        item("resource limits on", huge.status_code == 413,
             f"upload size: {(limit + 2**20) / 2**20:.0f} MB upload (limit {limit / 2**20:.0f} MB) -> "
             f"{huge.status_code}; CPU and memory limits belong to the container")
    else:
        item("resource limits on", False, "GET /ready does not say the upload limit")
    garbage = requests.post(service_url + "/predict", files={"file": ("x.png", b"garbage", "image/png")},
                            headers=headers, timeout=10)
    clear = garbage.status_code < 500 and "error" in garbage.json()
    code = garbage.json().get("error", {}).get("code")
    item("errors handled (4xx JSON, no 500)", clear, f"garbage upload -> {garbage.status_code} {code}")
    metrics = get("/metrics")
    item("monitoring: metrics exposed", REQUESTS_METRIC in getattr(metrics, "text", ""), f"GET /metrics: {REQUESTS_METRIC}")
    item("batching configured", info.get("batching", {}).get("max_batch_size", 1) > 1, f"batching={info.get('batching')}")
    docs = get("/openapi.json")
    item("API documented", getattr(docs, "status_code", None) == 200, "GET /openapi.json")
    item("drift detection configured", drift_detector is not None,
         type(drift_detector).__name__ if drift_detector is not None else "none")
    return pd.DataFrame(rows).set_index("item")


def _is_zip_with(path: Path, marker: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(marker in name for name in archive.namelist())
    except (zipfile.BadZipFile, FileNotFoundError):
        return False
