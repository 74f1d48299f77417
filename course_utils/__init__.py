"""course_utils: the small companion package of the "Deploying PyTorch Models" course.

Modules, each named after what it holds:

* :mod:`course_utils.env` - device choice, seeding, thread pinning, environment report
* :mod:`course_utils.data` - the digits dataset, transforms, sample images
* :mod:`course_utils.models` - the course CNN, the control-flow model, the checkpoint loader
* :mod:`course_utils.train` - a short training loop and evaluation
* :mod:`course_utils.bench` - latency / throughput / size measurement and comparison tables
* :mod:`course_utils.export` - parity checks, ONNX Runtime sessions, the C++ loader
* :mod:`course_utils.monitoring` - latency monitor, Prometheus parsing, drift detection
* :mod:`course_utils.production` - production wrapper, canary router, checklist
* :mod:`course_utils.registry` - the model registry (safe to share between processes)
* :mod:`course_utils.serving` - the inference service (imported on demand)
"""

import os

# Idle OpenMP threads sleep instead of spinning. PyTorch's OpenMP runtime reads this once, when
# torch is first imported: with the default (spin a while after each parallel region) one busy
# core elsewhere on the machine made the lessons 5-7x slower (measured; see README, "Timings").
# `make` exports it too, and each lesson's first cell sets it before `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402 - after the variable above
from typing import TYPE_CHECKING  # noqa: E402

__version__ = "0.1.0"
__all__ = ["bench", "data", "env", "export", "models", "train", "__version__"]

if TYPE_CHECKING:
    from . import bench, data, env, export, models, train  # noqa: F401


def __getattr__(name: str):  # noqa: ANN202 - PEP 562: submodules load on first use
    """``course_utils.bench`` etc. import on first use, so the service never loads pandas or matplotlib."""
    if name in __all__ and name != "__version__":
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
