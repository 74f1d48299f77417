"""Environment helpers: device choice, seeding, thread pinning and an environment report.

Every lesson starts with the same three lines::

    from course_utils import env
    env.setup()            # seed + pin threads, returns the device
    env.print_report()

so that numbers printed in a notebook mean the same thing on a laptop, in CI and on Colab.
"""

from __future__ import annotations

import inspect
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
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
    """The 16-bit float type that runs natively on ``device``, or None.

    ``float16`` on CUDA (tensor cores); ``bfloat16`` on a CPU whose oneDNN has native bf16
    kernels (AVX512-BF16 or AMX); ``None`` elsewhere, where bf16 would be emulated and slower
    than float32. Native is not the same as faster for *your* model: on a tiny model the
    conversions can cost more than they save (lesson 03 times it on a CPU that has bf16). Remember to cast the *inputs*
    too: a half-precision model fed float32 tensors fails on CUDA (the chapter's ``ProductionModel``
    bug).

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


def show_source(*objects: object) -> object:
    """The whole source of functions, classes or methods, highlighted, to display in a notebook.

    Lessons use it to show the production code a cell has just run, in full (never an excerpt that
    could drift from the package): ``env.show_source(monitoring.LatencyMonitor)``. A ``Path`` shows
    that whole file. Each object is headed by the module (or the file's path in the repository) it
    comes from. Returns an ``IPython.display.Code`` (its plain-text form
    is the source itself).

    >>> print(show_source(configured_threads).data.splitlines()[:2])
    ['# course_utils.env', 'def configured_threads() -> int:']
    """
    from IPython.display import Code

    if not objects:
        raise ValueError("show_source needs at least one function, class or method")
    parts = []
    for obj in objects:
        if isinstance(obj, Path):          # a whole file of the repository (a handler, a Dockerfile)
            name = obj.resolve().relative_to(REPO_DIR).as_posix() if obj.resolve().is_relative_to(REPO_DIR) else obj.name
            parts.append(f"# {name}\n" + obj.read_text().rstrip("\n"))
            continue
        target = inspect.unwrap(obj)  # type: ignore[arg-type]
        try:
            text = inspect.getsource(target)  # type: ignore[arg-type]
        except (TypeError, OSError) as error:
            raise TypeError(f"no Python source for {obj!r}: pass a function, class or method") from error
        module = getattr(target, "__module__", None) or "?"
        parts.append(f"# {module}\n" + textwrap.dedent(text).rstrip("\n"))   # a method: as if at the top level
    return Code("\n\n\n".join(parts), language="python")


@dataclass
class CapturedStderr:
    """What native code wrote to file descriptor 2 inside :func:`capture_native_stderr`."""

    text: str = ""


@contextmanager
def capture_native_stderr() -> Iterator[CapturedStderr]:
    r"""Capture what native libraries write to stderr inside the block, at both levels.

    A C/C++ library writes either to the process's file descriptor 2 or, through its Python
    bindings, to ``sys.stderr`` (ExecuTorch's runtime log does the latter). In Jupyter either
    surfaces in whichever cell runs when it arrives; here both are kept, in ``.text`` after the block.

    >>> with capture_native_stderr() as captured:
    ...     _ = os.write(2, b"from C\n")
    ...     print("from the bindings", file=sys.stderr)
    >>> captured.text
    'from C\nfrom the bindings\n'
    """
    import contextlib
    import io

    captured = CapturedStderr()
    python_level = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_level):
                yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace") + python_level.getvalue()


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python, NumPy and torch (CPU and all GPUs) with one number.

    >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(a == torch.rand(1))
    True
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PYTHONHASHSEED"] = str(seed)


def configured_threads() -> int:
    """The thread count lessons pin: ``COURSE_THREADS`` if set, else :data:`DEFAULT_THREADS` (2).

    >>> configured_threads() >= 1
    True
    """
    value = os.environ.get("COURSE_THREADS", str(DEFAULT_THREADS))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"COURSE_THREADS must be a whole number >= 1, got {value!r}") from None


def set_threads(n: int | None = None) -> int:
    """Pin torch's intra-op thread count (default ``COURSE_THREADS`` or 2) and return it.

    Latency and float results both depend on the thread count; pinning it makes printed
    numbers comparable between runs and machines.

    >>> set_threads(1)
    1
    """
    if n is None:
        n = configured_threads()
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


#: The CPU features that change which kernels PyTorch, oneDNN and ONNX Runtime pick, by the names
#: Linux's /proc/cpuinfo uses (x86: "flags", ARM: "Features"), and how the report names them.
_CPU_FEATURES = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "asimd": "NEON", "asimddp": "NEON-dotprod", "i8mm": "I8MM", "bf16": "BF16", "sve": "SVE", "sve2": "SVE2", "sme": "SME",
}
#: macOS names of the same ARM features (``sysctl hw.optional...``).
_MACOS_FEATURES = {"hw.optional.neon": "NEON", "hw.optional.arm.FEAT_DotProd": "NEON-dotprod",
                   "hw.optional.arm.FEAT_I8MM": "I8MM", "hw.optional.arm.FEAT_BF16": "BF16",
                   "hw.optional.arm.FEAT_SME": "SME"}


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_features(cpuinfo: dict[str, str] | None = None) -> list[str]:
    """The CPU's features that matter for inference speed (SIMD width, int8 dot products, bf16, AMX).

    Speed-ups of compiled kernels, int8 and bf16 depend on these, so every timing table in the
    course comes with them. ``cpuinfo`` is for tests; by default the running machine is read
    (Linux: /proc/cpuinfo; macOS: sysctl). An unknown platform gives an empty list.

    >>> cpu_features({"flags": "fpu sse2 avx2 fma avx512f avx512_vnni"})
    ['AVX2', 'FMA', 'AVX-512', 'AVX512-VNNI']
    >>> cpu_features({"Features": "fp asimd asimddp i8mm"})
    ['NEON', 'NEON-dotprod', 'I8MM']
    """
    if cpuinfo is None and sys.platform == "darwin":
        found = []
        for key, name in _MACOS_FEATURES.items():
            result = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, check=False)
            if result.stdout.strip() == "1":
                found.append(name)
        return found
    info = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [name for flag, name in _CPU_FEATURES.items() if flag in flags]


def cpu_name() -> str:
    """A human-readable CPU model, e.g. ``"AMD EPYC 7B13"`` (falls back to the architecture)."""
    info = _cpuinfo()
    name = info.get("model name") or info.get("Hardware") or ""
    if not name and sys.platform == "darwin":
        result = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False)
        name = result.stdout.strip()
    return name or platform.processor() or platform.machine()


def hardware_summary() -> str:
    """One line naming the CPU, its inference-relevant features, cores and the threads in use.

    Print it next to timings: a speed-up measured on an AVX-512 server says little about an ARM laptop.

    >>> "threads in use" in hardware_summary()
    True
    """
    features = ", ".join(cpu_features()) or "no AVX2/AVX-512/NEON flags found"
    return (f"{cpu_name()} ({platform.machine()}): {features}; "
            f"{os.cpu_count()} logical cores, {torch.get_num_threads()} threads in use")


def quantized_engine() -> str:
    """The eager-mode int8 backend for this CPU: ``"x86"`` on Intel/AMD, ``"qnnpack"`` on ARM.

    It is also what ``torch.backends.quantized.engine`` must be set to before the model runs.

    >>> quantized_engine() in ("x86", "fbgemm", "qnnpack")
    True
    """
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm", "qnnpack"):
        if engine in engines:
            return engine
    raise RuntimeError(f"this torch build has no int8 CPU backend (supported engines: {engines})")


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
    cpu: str
    cpu_features: str
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
        name = cpu_name()
    return EnvironmentReport(
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
        torch=torch.__version__,
        torchvision=_version("torchvision"),
        onnxruntime=_version("onnxruntime"),
        device=device.type,
        device_name=name,
        cpu=cpu_name(),
        cpu_features=", ".join(cpu_features()) or "-",
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
