"""ONNX Runtime sessions with the options that matter; no PyTorch needed.

The course's service serves ``.onnx`` models through these functions without ever importing
torch (a container image then needs neither the torch wheel nor its start-up time). Lessons
reach them as ``course_utils.export.ort_session`` and friends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def onnx_graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto in an ONNX graph: initializers, Constant values, and those of subgraphs (If, Loop)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from onnx_graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from onnx_graph_tensors(subgraph)


def default_threads() -> int:
    """Intra-op threads: torch's count when torch is loaded (the lessons pin it), else
    ``COURSE_THREADS``, else the number of cores."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    value = os.environ.get("COURSE_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else (os.cpu_count() or 1)


def ort_providers(device: Any = None) -> list[str]:
    """Execution providers to request: CUDA first when the device is CUDA and ORT offers it, then CPU.

    ``device`` is ``"cuda"``, ``"cuda:1"``, ``"cpu"``, a ``torch.device`` or None (CPU).

    >>> ort_providers("cpu")
    ['CPUExecutionProvider']
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device is not None and str(device).split(":")[0] == "cuda" and "CUDAExecutionProvider" in available:
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


def ort_session(path: str | Path, providers: Sequence[str] | None = None, level: str = "all",
                threads: int | None = None, optimized_path: str | Path | None = None,
                spinning: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` with the options that matter, checked after creation.

    ``level`` is one of ``"disable"``, ``"basic"``, ``"extended"``, ``"all"`` (graph optimisations);
    ``threads`` sets intra-op threads (default: torch's current count if torch is loaded, else
    ``COURSE_THREADS`` or the number of cores); ``optimized_path`` saves the
    optimised graph. ORT silently falls back to CPU when a requested GPU provider cannot start:
    this function raises instead (see :func:`check_providers`).

    ``spinning=False`` (the course default) stops ORT's idle threads from busy-waiting after each
    run (``session.intra_op.allow_spinning``). Spinning wins a little latency on a machine that does
    nothing else; next to other work (PyTorch timed in turn with ORT, a web server, a busy core) it
    steals the CPU: eager ResNet-18 timed right after ORT runs was 2.7x slower with it on.
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise ValueError(f"unknown optimisation level {level!r}: use one of {list(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers = list(providers or ["CPUExecutionProvider"])
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    check_providers(session, providers)
    return session


def check_providers(session: Any, requested: Sequence[str]) -> list[str]:
    """Fail unless every requested execution provider is actually in use by ``session``."""
    in_use = list(session.get_providers())
    missing = [p for p in requested if p not in in_use]
    if missing:
        raise RuntimeError(f"ONNX Runtime fell back: requested {list(requested)}, in use {in_use}. "
                           "Check the onnxruntime-gpu install and its CUDA/cuDNN versions.")
    return in_use
