import time

import numpy as np
import pandas as pd
import pytest
import torch

from course_utils import bench


def test_measure_latency_counts_calls_and_excludes_warmup():
    calls = []

    def fn(x):
        calls.append(1)
        time.sleep(0.002)
        return x

    stats = bench.measure_latency(fn, torch.zeros(4, 3), warmup=3, iters=7)
    assert len(calls) == 10 and len(stats.samples_ms) == 7
    assert stats.batch_size == 4
    assert stats.p50_ms >= 2.0
    assert stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    assert stats.throughput == pytest.approx(4 / (stats.p50_ms / 1000))


def test_measure_latency_runs_under_inference_mode():
    seen = []
    bench.measure_latency(lambda x: seen.append(torch.is_inference_mode_enabled()), torch.zeros(1), 1, 2)
    assert seen == [True, True, True]


def test_measure_latency_refuses_training_mode_and_bad_counts():
    with pytest.raises(ValueError, match="model.eval"):
        bench.measure_latency(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="model.eval"):
        bench.measure_latency(torch.nn.BatchNorm1d(2), torch.zeros(3, 2))
    # No mode-dependent layer, so the flag does not matter (an ExportedProgram's module() says training=True).
    assert bench.measure_latency(torch.nn.Linear(2, 2), torch.zeros(1, 2), warmup=0, iters=1).batch_size == 1
    with pytest.raises(ValueError, match="iters"):
        bench.measure_latency(torch.nn.Linear(2, 2).eval(), torch.zeros(1, 2), iters=0)


def test_stats_percentiles_follow_numpy():
    stats = bench.LatencyStats(samples_ms=np.arange(1, 101, dtype=float), batch_size=2)
    assert stats.mean_ms == 50.5
    assert stats.p50_ms == pytest.approx(50.5) and stats.p99_ms == pytest.approx(99.01)
    assert set(stats.as_dict()) == {"batch", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "items_per_s"}


def test_model_size_of_module_and_file(tmp_path):
    linear = torch.nn.Linear(100, 100)
    size = bench.model_size_bytes(linear)
    assert 40_000 < size < 45_000  # 10,100 float32 values plus a small header
    path = tmp_path / "w.pt"
    torch.save(linear.state_dict(), path)
    assert bench.model_size_bytes(path) == path.stat().st_size
    with pytest.raises(FileNotFoundError):
        bench.model_size_bytes(tmp_path / "missing.pt")


def test_compare_builds_a_table_with_speedups():
    slow = bench.LatencyStats(np.full(10, 4.0), batch_size=1)
    fast = bench.LatencyStats(np.full(10, 1.0), batch_size=1)
    table = bench.compare({"eager": slow, "onnx": fast, "other": {"p50_ms": 2.0, "size_mb": 1.0}})
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == ["eager", "onnx", "other"]
    assert table.loc["onnx", "speedup"] == 4.0 and table.loc["other", "speedup"] == 2.0
    assert bench.compare({"a": slow, "b": fast}, baseline="b").loc["a", "speedup"] == 0.25
    with pytest.raises(ValueError):
        bench.compare({})
    with pytest.raises(KeyError, match="baseline"):
        bench.compare({"a": slow}, baseline="z")


def test_plot_comparison_draws_bars_and_checks_columns():
    import matplotlib

    matplotlib.use("Agg")
    table = bench.compare({"a": bench.LatencyStats(np.full(5, 2.0), 1), "b": bench.LatencyStats(np.full(5, 1.0), 1)})
    ax = bench.plot_comparison(table, title="t")
    assert len(ax.patches) == 4 and ax.get_title() == "t"
    with pytest.raises(KeyError, match="not in the table"):
        bench.plot_comparison(table, columns=("nope",))


def test_measure_interleaved_takes_one_input_per_variant():
    seen = []

    def fn(x):
        seen.append(x.shape[0])
        return x

    stats = bench.measure_interleaved({"b1": fn, "b4": fn}, {"b1": torch.zeros(1, 2), "b4": torch.zeros(4, 2)},
                                      warmup=0, iters=2)
    assert seen == [1, 4, 1, 4]
    assert (stats["b1"].batch_size, stats["b4"].batch_size) == (1, 4)
    with pytest.raises(ValueError, match="same names"):
        bench.measure_interleaved({"b1": fn, "b4": fn}, {"b1": torch.zeros(1, 2)})


def test_measure_interleaved_alternates_variants_and_keeps_their_samples():
    order = []

    def make(name, delay):
        def fn(x):
            order.append(name)
            time.sleep(delay)
            return x
        return fn

    stats = bench.measure_interleaved({"slow": make("slow", 0.004), "fast": make("fast", 0.001)}, torch.zeros(3, 2),
                                      warmup=1, iters=5)
    assert order[:4] == ["slow", "fast", "slow", "fast"], "variants must alternate"
    assert len(stats["slow"].samples_ms) == 5 and stats["fast"].batch_size == 3
    assert stats["slow"].p50_ms > stats["fast"].p50_ms
    with pytest.raises(ValueError):
        bench.measure_interleaved({}, torch.zeros(1))
    with pytest.raises(ValueError, match="model.eval"):
        bench.measure_interleaved({"train": torch.nn.Dropout()}, torch.zeros(1))


def _stats(ms, n=bench.MIN_RUNS, batch=1):
    return bench.LatencyStats(samples_ms=np.full(n, float(ms)), batch_size=batch)


def test_latency_table_has_medians_speedups_and_throughput_per_batch():
    table = bench.latency_table({"b1": {"eager": _stats(2.0), "ort": _stats(0.5)},
                                 "b32": {"eager": _stats(8.0, batch=32), "ort": _stats(4.0, batch=32)}},
                                throughput=True)
    assert list(table.columns) == ["p50_ms b1", "p50_ms b32", "items/s b1", "items/s b32", "speedup b1", "speedup b32"]
    assert table.loc["ort", "speedup b1"] == 4.0 and table.loc["ort", "speedup b32"] == 2.0
    assert table.loc["eager", "items/s b32"] == 4000.0
    assert bench.latency_table({"b1": {"a": _stats(1.0), "b": _stats(2.0)}}, baseline="b")["speedup b1"].tolist() == [2.0, 1.0]


def test_latency_table_refuses_a_median_of_few_calls_and_unknown_baselines():
    with pytest.raises(ValueError, match="from 3 calls: time at least 20"):
        bench.latency_table({"b32": {"eager": _stats(1.0), "resnet": _stats(1.0, n=3)}})
    with pytest.raises(KeyError, match="baseline 'x'"):
        bench.latency_table({"b1": {"a": _stats(1.0)}}, baseline="x")
    with pytest.raises(ValueError, match="nothing to tabulate"):
        bench.latency_table({"b1": {}})


def test_check_alone_passes_a_fair_table_and_fails_a_slowed_one():
    def fn(x):
        time.sleep(0.002)
        return x

    fair = bench.measure_latency(fn, torch.zeros(1), warmup=1, iters=20)
    check = bench.check_alone(fn, torch.zeros(1), fair, label="sleep", iters=20)
    assert check.agrees and "sleep alone: p50" in str(check) and "within 2x" in str(check)
    slowed = _stats(fair.p50_ms * 10)          # as if a spinning neighbour had taken the cores
    with pytest.raises(AssertionError, match="slow each other down"):
        bench.check_alone(fn, torch.zeros(1), slowed, iters=20, attempts=2)
    with pytest.raises(ValueError, match="factor"):
        bench.check_alone(fn, torch.zeros(1), fair, factor=1.0)


def test_checked_table_measures_again_after_a_burst_and_fails_a_neighbour_that_always_slows():
    calls = {"n": 0}

    def burst_then_quiet(x):       # the first table's calls land in a burst of background load
        calls["n"] += 1
        time.sleep(0.02 if calls["n"] <= 25 else 0.002)
        return x

    models = {"a": burst_then_quiet, "b": lambda x: x}
    stats, verdict = bench.measure_interleaved_checked(models, torch.zeros(1), label="a", warmup=0, iters=20)
    assert verdict.agrees and stats["a"].p50_ms < 10 and calls["n"] > 40     # measured twice, kept the fair one

    slowed = {"next": False}

    def victim(x):
        time.sleep(0.02 if slowed["next"] else 0.002)
        slowed["next"] = False
        return x

    def spinner(x):                # steals the cores from whatever runs next, every time
        slowed["next"] = True
        return x

    with pytest.raises(AssertionError, match="in 2 attempts, table and alone disagreed every time"):
        bench.measure_interleaved_checked({"victim": victim, "spinner": spinner}, torch.zeros(1), warmup=0,
                                          iters=20, attempts=2)
    with pytest.raises(KeyError, match="check='c'"):
        bench.measure_interleaved_checked(models, torch.zeros(1), check="c")
