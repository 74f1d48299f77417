"""Environment helpers: device choice, seeding, thread pinning and an environment report.

Every lesson starts with the same three lines::

    from course_utils import env
    env.setup()            # seed + pin threads, returns the device
    env.print_report()

so that numbers printed in a notebook mean the same thing on a laptop, in CI and on Colab.
"""

from __future__ import annotations

import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Threads used for every printed number. Float reductions depend on the thread count, so a
#: fixed value (not ``os.cpu_count()``) keeps notebook outputs identical on machines with more
#: cores. Override with the ``COURSE_THREADS`` environment variable.
DEFAULT_THREADS = 2
DEFAULT_SEED = 0


#: Where lessons write files (ignored by git): ``<repository>/artifacts``; ``COURSE_ARTIFACTS`` overrides.
REPO_DIR = Path(__file__).resolve().parent.parent


def artifacts_dir(lesson: str = "") -> Path:
    """Return (and create) the scratch folder for a lesson's files, e.g. ``artifacts/01_torchscript``.

    Lessons never write next to the notebook: exported models, plots and logs go here.

    >>> artifacts_dir("doctest").name
    'doctest'
    """
    root = Path(os.environ.get("COURSE_ARTIFACTS", REPO_DIR / "artifacts"))
    folder = root / lesson if lesson else root
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def in_colab() -> bool:
    """Return True when running inside Google Colab.

    >>> in_colab()
    False
    """
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def pick_device(prefer: str | None = None) -> torch.device:
    """Pick the best available device: CUDA, then Apple MPS, then CPU.

    ``prefer`` (``"cuda"``, ``"mps"`` or ``"cpu"``) asks for one device; if it is not available
    the function falls back to CPU instead of failing, so a notebook written on a GPU still runs
    on a laptop. The environment variable ``COURSE_DEVICE`` sets ``prefer`` for a whole run.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    prefer = (prefer or os.environ.get("COURSE_DEVICE") or "").lower() or None
    if prefer not in (None, "cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {prefer!r}: use 'cuda', 'mps', 'cpu' or None")
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "cuda":
        return torch.device("cuda" if cuda_ok else "cpu")
    if prefer == "mps":
        return torch.device("mps" if mps_ok else "cpu")
    if cuda_ok:
        return torch.device("cuda")
    if mps_ok:
        return torch.device("mps")
    return torch.device("cpu")


def reduced_precision(device: str | torch.device) -> torch.dtype | None:
    """The 16-bit float type worth using for inference on ``device``, or None.

    ``float16`` on CUDA (tensor cores); ``bfloat16`` on a CPU whose oneDNN has native bf16
    kernels (AVX512-BF16 or AMX); ``None`` elsewhere, where bf16 would be emulated and slower
    than float32. Remember to cast the *inputs* too: a half-precision model fed float32
    tensors fails on CUDA (the chapter's ``ProductionModel`` bug).

    >>> reduced_precision("cuda")
    torch.float16
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python, NumPy and torch (CPU and all GPUs) with one number.

    >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(a == torch.rand(1))
    True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)


def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op thread count (default ``COURSE_THREADS`` or 2) and return it.

    Latency and float results both depend on the thread count; pinning it makes printed
    numbers comparable between runs and machines.

    >>> set_threads(1)
    1
    """
    if n is None:
        n = int(os.environ.get("COURSE_THREADS", DEFAULT_THREADS))
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    return torch.get_num_threads()


def setup(seed: int = DEFAULT_SEED, threads: int | None = None, prefer: str | None = None) -> torch.device:
    """Seed everything, pin threads and return the device to use: the first cell of a lesson.

    >>> setup(prefer="cpu")
    device(type='cpu')
    """
    seed_everything(seed)
    set_threads(threads)
    return pick_device(prefer)


@dataclass(frozen=True)
class EnvironmentReport:
    """The facts a learner pastes into a bug report."""

    python: str
    platform: str
    torch: str
    torchvision: str
    onnxruntime: str
    device: str
    device_name: str
    threads: int
    colab: bool

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    return str(getattr(mod, "__version__", "unknown"))


def environment_report(device: torch.device | None = None) -> EnvironmentReport:
    """Collect versions, device and thread count.

    >>> environment_report(torch.device("cpu")).device
    'cpu'
    """
    device = device or pick_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = "Apple GPU (MPS)"
    else:
        name = platform.processor() or platform.machine()
    return EnvironmentReport(
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        torch=torch.__version__,
        torchvision=_version("torchvision"),
        onnxruntime=_version("onnxruntime"),
        device=device.type,
        device_name=name,
        threads=torch.get_num_threads(),
        colab=in_colab(),
    )


def print_report(device: torch.device | None = None) -> EnvironmentReport:
    """Print the environment report as aligned ``key: value`` lines and return it."""
    report = environment_report(device)
    fields = report.as_dict()
    width = max(map(len, fields))
    for key, value in fields.items():
        print(f"{key:<{width}} : {value}")
    return report
