"""Watching a model in production: latency percentiles, Prometheus metrics, input and prediction drift.

* :class:`LatencyMonitor` - the chapter's monitor, fixed: warm-up excluded, ``inference_mode``,
  CUDA synchronisation, and percentiles over a sliding window instead of an all-time mean.
* :func:`parse_prometheus` / :func:`histogram_quantile` - read a ``/metrics`` page the way a
  dashboard does.
* :class:`DriftDetector` - compare a live window of inputs and predictions with a reference
  (the test split) using PSI, a Kolmogorov-Smirnov test and a chi-square test.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch


class LatencyMonitor:
    """Time model calls and keep the last ``window`` latencies (milliseconds).

    >>> monitor = LatencyMonitor(window=100, warmup=2)
    >>> for _ in range(5):
    ...     _ = monitor.run(torch.nn.Identity(), torch.zeros(1))
    >>> monitor.count, len(monitor.samples)
    (3, 3)
    """

    def __init__(self, window: int = 1000, warmup: int = 5) -> None:
        if window < 1 or warmup < 0:
            raise ValueError("window must be >= 1 and warmup >= 0")
        self.samples: deque[float] = deque(maxlen=window)
        self.warmup = warmup
        self.seen = 0
        self.count = 0

    def record(self, milliseconds: float) -> None:
        """Add one measurement (the first ``warmup`` ones are discarded)."""
        self.seen += 1
        if self.seen > self.warmup:
            self.samples.append(float(milliseconds))
            self.count += 1

    def run(self, model: Callable[..., Any], *inputs: Any) -> Any:
        """Call ``model(*inputs)`` under ``inference_mode``, timing it (with CUDA sync), and return its output."""
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
        cuda = device is not None and device.type == "cuda"
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            output = model(*inputs)
            if cuda:
                torch.cuda.synchronize(device)
        self.record((time.perf_counter() - start) * 1000.0)
        return output

    def percentiles(self, qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
        if not self.samples:
            raise ValueError("no measurements yet (warm-up calls are not counted)")
        values = np.asarray(self.samples)
        return {f"p{q:g}": float(np.percentile(values, q)) for q in qs}

    def report(self) -> dict[str, float]:
        """Count, mean, max and p50/p95/p99 over the window, in milliseconds."""
        values = np.asarray(self.samples)
        return {"count": len(values), "mean_ms": float(values.mean()), "max_ms": float(values.max()),
                **{f"{k}_ms": v for k, v in self.percentiles().items()}}


# ----------------------------------------------------------------------------- Prometheus

def parse_prometheus(text: str) -> pd.DataFrame:
    """Every sample of a Prometheus text page: columns ``name``, ``labels`` (a dict) and ``value``."""
    from prometheus_client.parser import text_string_to_metric_families

    rows = [{"name": sample.name, "labels": dict(sample.labels), "value": float(sample.value)}
            for family in text_string_to_metric_families(text) for sample in family.samples]
    return pd.DataFrame(rows, columns=["name", "labels", "value"])


def metric_sum(samples: pd.DataFrame, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    rows = samples[samples.name == name]
    if rows.empty:   # no such series yet (a counter whose labels were never seen): 0, not a KeyError
        return 0.0
    mask = rows["labels"].map(lambda have: all(have.get(k) == v for k, v in labels.items())).astype(bool)
    return float(rows.loc[mask, "value"].sum())


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """PromQL's ``histogram_quantile``: estimate a quantile from cumulative bucket counts.

    ``buckets`` maps each upper bound ``le`` (``math.inf`` for the last) to the cumulative count.
    Linear interpolation inside the bucket where the quantile falls, as Prometheus does.

    >>> round(histogram_quantile(0.5, {0.1: 10, 0.2: 30, math.inf: 40}), 6)
    0.15
    """
    if not 0 <= q <= 1:
        raise ValueError("q must be in [0, 1]")
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return previous_bound  # Prometheus returns the highest finite bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def histogram_buckets(samples: pd.DataFrame, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram ``name`` (summed over other labels) as ``{le: count}``."""
    rows = samples[samples.name == f"{name}_bucket"]
    buckets: dict[float, float] = {}
    for have, value in zip(rows["labels"], rows["value"], strict=True):
        if all(have.get(k) == v for k, v in labels.items()):
            le = float(have["le"])
            buckets[le] = buckets.get(le, 0.0) + value
    return buckets


# ----------------------------------------------------------------------------- drift

def psi(reference: np.ndarray, live: np.ndarray, bins: int = 10, edges: np.ndarray | None = None) -> float:
    """Population Stability Index of a continuous feature, with bins at the reference's quantiles.

    Rules of thumb: < 0.1 no shift, 0.1-0.2 moderate, > 0.2 significant.

    >>> rng = np.random.default_rng(0)
    >>> round(psi(rng.normal(size=5000), rng.normal(size=5000)), 2) < 0.1
    True
    """
    reference, live = np.asarray(reference, dtype=float), np.asarray(live, dtype=float)
    if edges is None:
        edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    inner = edges[1:-1]
    ref_counts = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=len(edges) - 1)
    live_counts = np.bincount(np.searchsorted(inner, live, side="right"), minlength=len(edges) - 1)
    return psi_from_counts(ref_counts, live_counts)


def psi_from_counts(reference_counts: np.ndarray, live_counts: np.ndarray, epsilon: float = 1e-4) -> float:
    """PSI of two histograms over the same bins (e.g. predicted-class counts)."""
    ref = np.asarray(reference_counts, dtype=float)
    cur = np.asarray(live_counts, dtype=float)
    ref = np.clip(ref / ref.sum(), epsilon, None)
    cur = np.clip(cur / cur.sum(), epsilon, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def image_features(batch: torch.Tensor) -> np.ndarray:
    """Per-image summary features of a batch of (N, 1, H, W) inputs: mean and spread of the ink."""
    flat = batch.detach().float().flatten(1).cpu().numpy()
    return np.column_stack([flat.mean(axis=1), flat.std(axis=1)])


FEATURE_NAMES = ("ink mean", "ink std")


@dataclass
class DriftReport:
    """Per-check statistics and whether each one alarms."""

    checks: pd.DataFrame
    window: int

    @property
    def drifted(self) -> bool:
        return bool(self.checks["alarm"].any())


@dataclass
class DriftDetector:
    """Compares live inputs and predictions with a reference set.

    Inputs: each image's ink mean and std, by PSI and a two-sample KS test. Predictions: the
    predicted-class distribution, by PSI and a chi-square goodness-of-fit test against the
    reference's class frequencies. A check alarms when PSI > ``psi_threshold`` **or** its test's
    p-value < ``alpha``.
    """

    reference_features: np.ndarray
    reference_classes: np.ndarray
    num_classes: int = 10
    psi_threshold: float = 0.2
    alpha: float = 0.01
    edges: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def fit(cls, inputs: torch.Tensor, predicted: torch.Tensor, **kwargs: Any) -> DriftDetector:
        """Build the reference from inputs and the model's predictions on them (e.g. the test split)."""
        features = image_features(inputs)
        detector = cls(features, np.asarray(predicted), **kwargs)
        detector.edges = [np.unique(np.quantile(features[:, i], np.linspace(0, 1, 11))) for i in range(features.shape[1])]
        return detector

    def check(self, inputs: torch.Tensor, predicted: torch.Tensor) -> DriftReport:
        from scipy import stats

        live = image_features(inputs)
        rows = []
        for i, name in enumerate(FEATURE_NAMES):
            edges = self.edges[i] if self.edges else None
            value = psi(self.reference_features[:, i], live[:, i], edges=edges)
            p_value = float(stats.ks_2samp(self.reference_features[:, i], live[:, i]).pvalue)
            rows.append({"check": f"input: {name}", "psi": value, "test": "KS", "p_value": p_value})
        ref_counts = np.bincount(self.reference_classes, minlength=self.num_classes)
        live_counts = np.bincount(np.asarray(predicted), minlength=self.num_classes)
        expected = np.clip(ref_counts / ref_counts.sum(), 1e-6, None) * live_counts.sum()
        expected = expected * live_counts.sum() / expected.sum()
        p_value = float(stats.chisquare(live_counts, expected).pvalue)
        rows.append({"check": "predicted classes", "psi": psi_from_counts(ref_counts, live_counts),
                     "test": "chi-square", "p_value": p_value})
        checks = pd.DataFrame(rows).set_index("check")
        checks["alarm"] = (checks["psi"] > self.psi_threshold) | (checks["p_value"] < self.alpha)
        return DriftReport(checks, window=len(live))
