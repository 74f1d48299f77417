"""Latency, throughput and size measurements, done the same way in every lesson.

Rules the helpers enforce, because each one changes the numbers:

* **warm-up** calls are run and thrown away (lazy init, allocator, oneDNN kernel selection);
* models run under ``torch.inference_mode()`` (no autograd bookkeeping);
* on CUDA the device is **synchronised** around every call (kernels are asynchronous, so a
  timer without a sync measures only the launch);
* every call is timed on its own, so we get a **distribution** (mean, p50, p95, p99), not just
  a mean that hides the tail.

:func:`measure_latency` times single calls with ``time.perf_counter``.
``torch.utils.benchmark.Timer`` is the better tool for a robust *median* alone (it handles
warm-up, threads and CUDA sync and picks the number of runs itself), but it times blocks of
calls and reports per-block averages, which smooths away exactly the tail latency (p95/p99)
that a service's users feel - hence the per-call timer for distributions.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

MIN_RUNS = 20
"""The fewest timed calls a quoted median comes from: with fewer, one slow call moves it."""


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency samples (milliseconds) at one batch size, and what follows from them."""

    samples_ms: np.ndarray
    batch_size: int

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p95_ms(self) -> float:
        return self.percentile(95)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    @property
    def throughput(self) -> float:
        """Items (images) per second at this batch size, from the median call."""
        return self.batch_size / (self.p50_ms / 1000.0)

    def as_dict(self) -> dict[str, float]:
        return {
            "batch": self.batch_size,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "items_per_s": self.throughput,
        }


_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _as_callable(model: Callable[..., Any]) -> Callable[..., Any]:
    # Refuse a module whose BatchNorm/Dropout layers are in training mode. (The `training` flag of
    # the module itself is not enough: ExportedProgram.module() says True but its graph was
    # captured in eval mode and holds no such layers.)
    if isinstance(model, nn.Module) and any(
            m.training for m in model.modules() if isinstance(m, _MODE_DEPENDENT)):
        raise ValueError("the model is in training mode: call model.eval() before measuring latency")
    return model


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_size(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1


def measure_latency(model: Callable[..., Any], inputs: Any, warmup: int = 10, iters: int = 100,
                    device: str | torch.device | None = None) -> LatencyStats:
    """Time ``iters`` single calls of ``model(inputs)`` after ``warmup`` discarded calls.

    ``inputs`` is one tensor/array or a tuple of positional arguments; its first dimension is
    the batch size. ``model`` can be an ``nn.Module`` (must be in eval mode) or any callable,
    e.g. an ONNX Runtime session wrapper. ``device`` defaults to the input tensor's device and
    enables CUDA synchronisation around each call.

    >>> stats = measure_latency(torch.nn.Linear(4, 2).eval(), torch.zeros(8, 4), warmup=1, iters=5)
    >>> stats.batch_size, len(stats.samples_ms)
    (8, 5)
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    fn = _as_callable(model)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if device is None and isinstance(args[0], torch.Tensor):
        device = args[0].device
    dev = torch.device(device) if device is not None else None
    samples = np.empty(iters, dtype=np.float64)
    with torch.inference_mode():
        for _ in range(warmup):
            fn(*args)
        _sync(dev)
        for i in range(iters):
            start = time.perf_counter()
            fn(*args)
            _sync(dev)
            samples[i] = (time.perf_counter() - start) * 1000.0
    return LatencyStats(samples_ms=samples, batch_size=_batch_size(args))


def measure_interleaved(models: Mapping[str, Callable[..., Any]], inputs: Any | Mapping[str, Any], warmup: int = 5,
                        iters: int = 50, device: str | torch.device | None = None) -> dict[str, LatencyStats]:
    """Time several variants on the same input **in turn** (A, B, C, A, B, C, ...).

    Use it when a claim compares variants: on a shared machine background load drifts, and timing
    A for a second and then B for a second lets the drift decide the ratio. Interleaving exposes
    every variant to the same conditions, so ratios of the returned medians are robust.
    ``inputs`` may also be a dict with one input per variant (same keys as ``models``), to compare
    batch sizes of one model, for example.

    >>> stats = measure_interleaved({"a": torch.nn.Identity(), "b": torch.nn.Identity()}, torch.zeros(2, 3), 1, 4)
    >>> sorted(stats), len(stats["a"].samples_ms)
    (['a', 'b'], 4)
    >>> linear = torch.nn.Linear(3, 1).eval()
    >>> stats = measure_interleaved({"b1": linear, "b8": linear}, {"b1": torch.zeros(1, 3), "b8": torch.zeros(8, 3)}, 1, 2)
    >>> stats["b8"].batch_size
    8
    """
    if iters < 1 or warmup < 0 or not models:
        raise ValueError("need at least one model, iters >= 1 and warmup >= 0")
    fns = {name: _as_callable(fn) for name, fn in models.items()}
    if isinstance(inputs, Mapping):
        if set(inputs) != set(fns):
            raise ValueError(f"per-variant inputs need the same names as the models: {sorted(inputs)} vs {sorted(fns)}")
        per_variant = {name: inputs[name] for name in fns}
    else:
        per_variant = dict.fromkeys(fns, inputs)
    arguments = {name: value if isinstance(value, tuple) else (value,) for name, value in per_variant.items()}
    first = next(iter(arguments.values()))[0]
    if device is None and isinstance(first, torch.Tensor):
        device = first.device
    dev = torch.device(device) if device is not None else None
    samples = {name: np.empty(iters, dtype=np.float64) for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for name, fn in fns.items():
                fn(*arguments[name])
        _sync(dev)
        for i in range(iters):
            for name, fn in fns.items():
                args = arguments[name]
                start = time.perf_counter()
                fn(*args)
                _sync(dev)
                samples[name][i] = (time.perf_counter() - start) * 1000.0
    return {name: LatencyStats(samples_ms=values, batch_size=_batch_size(arguments[name]))
            for name, values in samples.items()}


def latency_table(columns: Mapping[str, Mapping[str, LatencyStats]], baseline: str | None = None,
                  throughput: bool = False) -> pd.DataFrame:
    """One row per variant: ``p50_ms <label>`` and ``speedup <label>`` for each measured batch.

    ``columns`` maps a label (``"b1"``, ``"b32"``; ``""`` for plain ``p50_ms``/``speedup``) to the
    result of :func:`measure_interleaved` at that batch. ``speedup`` is the baseline's median over each row's (baseline: the first
    variant). ``throughput=True`` adds ``items/s <label>``. Refuses a median from fewer than
    :data:`MIN_RUNS` calls, so no table quotes a number that one slow call could move.

    >>> stats = LatencyStats(np.full(20, 2.0), 1)
    >>> latency_table({"b1": {"a": stats, "b": LatencyStats(np.full(20, 1.0), 1)}})["speedup b1"].tolist()
    [1.0, 2.0]
    """
    if not columns or not all(columns.values()):
        raise ValueError("nothing to tabulate: give at least one batch label with at least one variant")
    table = pd.DataFrame()
    for label, results in columns.items():
        for name, stats in results.items():
            if len(stats.samples_ms) < MIN_RUNS:
                raise ValueError(f"the median of {name!r} at {label} comes from {len(stats.samples_ms)} calls: "
                                 f"time at least {MIN_RUNS} (with fewer, one slow call moves it)")
        base = baseline if baseline is not None else next(iter(results))
        if base not in results:
            raise KeyError(f"baseline {base!r} is not one of {list(results)} (at {label})")
        medians = pd.Series({name: stats.p50_ms for name, stats in results.items()})
        table = table.reindex(table.index.union(medians.index, sort=False))
        table[_column("p50_ms", label)] = medians
        if throughput:
            table[_column("items/s", label)] = pd.Series({name: stats.throughput for name, stats in results.items()})
        table[_column("speedup", label)] = medians[base] / medians
    table = table[[_column(prefix, label) for prefix in ("p50_ms", "items/s", "speedup") for label in columns
                   if _column(prefix, label) in table]]
    table.index.name = "variant"
    return table


def _column(prefix: str, label: str) -> str:
    return f"{prefix} {label}" if label else prefix


@dataclass(frozen=True)
class AloneCheck:
    """A variant's median timed alone against its median inside an interleaved table."""

    label: str
    alone_ms: float
    table_ms: float
    factor: float

    @property
    def ratio(self) -> float:
        return self.table_ms / self.alone_ms

    @property
    def agrees(self) -> bool:
        return 1 / self.factor <= self.ratio <= self.factor

    def __str__(self) -> str:
        verdict = f"within {self.factor:g}x" if self.agrees else f"NOT within {self.factor:g}x"
        return (f"{self.label} alone: p50 {self.alone_ms:.2f} ms; in the interleaved table: "
                f"{self.table_ms:.2f} ms ({self.ratio:.2f}x, {verdict})")


def check_alone(model: Callable[..., Any], inputs: Any, in_table: LatencyStats, label: str = "eager",
                factor: float = 2.0, iters: int = 50, attempts: int = 3) -> AloneCheck:
    """Time ``model`` on its own and check its median agrees with the one in an interleaved table.

    Interleaving is fair only if the variants do not slow each other down: a runtime whose idle
    threads keep spinning after a call (ONNX Runtime's default) steals the cores from whatever is
    timed next, and the table then blames the neighbour. Call this right after
    :func:`measure_interleaved` with the baseline variant. Up to ``attempts`` measurements alone
    are made (a burst of background load can hit one), the closest one is kept, and
    ``AssertionError`` is raised if it still differs by more than ``factor``.

    >>> stats = measure_latency(torch.nn.Identity(), torch.zeros(1), warmup=1, iters=20)
    >>> check_alone(torch.nn.Identity(), torch.zeros(1), stats, factor=1000.0).agrees
    True
    """
    best = _closest_alone(model, inputs, in_table, label, factor, iters, attempts)
    if not best.agrees:
        raise AssertionError(f"{best}: the variants of the table slow each other down (a runtime spinning "
                             "after its calls?), so its ratios are not the variants' own")
    return best


def _closest_alone(model: Callable[..., Any], inputs: Any, in_table: LatencyStats, label: str, factor: float,
                   iters: int, attempts: int) -> AloneCheck:
    if factor <= 1 or attempts < 1:
        raise ValueError(f"need factor > 1 and attempts >= 1, got factor={factor}, attempts={attempts}")
    best: AloneCheck | None = None
    for _ in range(attempts):
        alone = measure_latency(model, inputs, warmup=5, iters=max(iters, MIN_RUNS)).p50_ms
        check = AloneCheck(label, alone, in_table.p50_ms, factor)
        if best is None or abs(np.log(check.ratio)) < abs(np.log(best.ratio)):
            best = check
        if best.agrees:
            break
    assert best is not None
    return best


def measure_interleaved_checked(models: Mapping[str, Callable[..., Any]], inputs: Any, check: str | None = None,
                                label: str | None = None, warmup: int = 5, iters: int = 50, factor: float = 2.0,
                                attempts: int = 3) -> tuple[dict[str, LatencyStats], AloneCheck]:
    """:func:`measure_interleaved`, then :func:`check_alone` on one variant; both redone if they disagree.

    On a shared machine a burst of background work can land on the table or on the measurement
    alone, and then the two disagree although no variant slowed another. So a disagreement is
    measured again, table and all, up to ``attempts`` times; a neighbour that really steals the
    cores (a runtime spinning after its calls) disagrees every time, and ``AssertionError`` names
    every attempt. ``check`` is the variant timed alone (default: the first); ``label`` names it
    in the printed verdict. Returns the table's stats and the verdict of the attempt that agreed.

    >>> stats, verdict = measure_interleaved_checked({"a": torch.nn.Identity(), "b": torch.nn.Identity()},
    ...                                              torch.zeros(1), warmup=1, iters=20, factor=1000.0)
    >>> sorted(stats), verdict.agrees
    (['a', 'b'], True)
    """
    if not models:
        raise ValueError("need at least one model")
    name = check if check is not None else next(iter(models))
    if name not in models:
        raise KeyError(f"check={check!r} is not one of {list(models)}")
    if attempts < 1:
        raise ValueError(f"need attempts >= 1, got {attempts}")
    single = inputs[name] if isinstance(inputs, Mapping) else inputs
    verdicts: list[AloneCheck] = []
    for _ in range(attempts):
        stats = measure_interleaved(models, inputs, warmup=warmup, iters=iters)
        verdict = _closest_alone(models[name], single, stats[name], label or name, factor, iters, attempts=1)
        if verdict.agrees:
            return stats, verdict
        verdicts.append(verdict)
    raise AssertionError(f"in {attempts} attempts, table and alone disagreed every time ("
                         + "; ".join(str(v) for v in verdicts) + "): the variants of the table slow each other "
                         "down (a runtime spinning after its calls?), so its ratios are not the variants' own")


def model_size_bytes(obj: nn.Module | str | Path) -> int:
    """Size in bytes: of a file on disk, or of a module's ``state_dict`` as ``torch.save`` writes it.

    >>> model_size_bytes(torch.nn.Linear(256, 256)) > 256 * 256 * 4
    True
    """
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path.stat().st_size
    buffer = io.BytesIO()
    torch.save(obj.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def compare(results: Mapping[str, LatencyStats | Mapping[str, float]],
            baseline: str | None = None) -> pd.DataFrame:
    """Put several measurements in one table, one row each, with a ``speedup`` column.

    ``results`` maps a variant name to a :class:`LatencyStats` or a plain dict of columns
    (e.g. ``{"p50_ms": ..., "size_mb": ...}``). ``speedup`` is the baseline's ``p50_ms`` divided
    by each row's (baseline: the first row, or ``baseline``); ratios survive a noisy machine
    better than absolute milliseconds.
    """
    if not results:
        raise ValueError("nothing to compare: results is empty")
    rows = {name: (r.as_dict() if isinstance(r, LatencyStats) else dict(r)) for name, r in results.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "variant"
    base = baseline if baseline is not None else next(iter(rows))
    if base not in rows:
        raise KeyError(f"baseline {base!r} is not one of {list(rows)}")
    if "p50_ms" in table:
        table["speedup"] = table.loc[base, "p50_ms"] / table["p50_ms"]
    return table


def plot_comparison(table: pd.DataFrame, columns: Sequence[str] = ("p50_ms", "p95_ms"),
                    ax: Any = None, title: str | None = None) -> Any:
    """Bar chart of latency columns from :func:`compare`; returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    missing = [c for c in columns if c not in table]
    if missing:
        raise KeyError(f"columns {missing} are not in the table (it has {list(table.columns)})")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    table[list(columns)].plot.bar(ax=ax, rot=0)
    ax.set_ylabel("milliseconds")
    ax.set_xlabel("")
    if title:
        ax.set_title(title)
    ax.figure.tight_layout()
    return ax


def markdown_table(frame: pd.DataFrame, index: bool = True, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (no extra dependency); floats to ``digits`` places."""
    frame = frame.reset_index() if index else frame
    cells = [[("" if v is None or v != v else f"{v:.{digits}f}" if isinstance(v, float) else str(v)) for v in row]
             for row in frame.itertuples(index=False)]
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
