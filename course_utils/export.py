"""Helpers for the export lessons: parity checks, ONNX Runtime sessions, the C++ loader.

The export calls themselves (``torch.jit.trace``, ``torch.export.export``,
``torch.onnx.export``, ``aoti_compile_and_package``) are written out in the notebooks; this module
carries the repetitive parts around them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .ort import check_providers, onnx_graph_tensors, ort_providers, ort_session  # noqa: F401  (torch-free)

if TYPE_CHECKING:
    import pandas as pd

#: The C++ program that loads a TorchScript file or an AOTInductor package (no Python).
CPP_SOURCE = Path(__file__).resolve().parent / "cpp" / "run_model.cpp"


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        value = value[0]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value.detach()
    raise TypeError(f"expected a tensor or an array, got {type(value).__name__}")


def assert_same_outputs(reference: Callable[..., Any], candidate: Callable[..., Any],
                        inputs: Iterable[torch.Tensor], atol: float = 1e-5, rtol: float = 1e-5) -> float:
    """Run both callables on every input and fail if any output differs beyond the tolerance.

    Outputs may be tensors, NumPy arrays, or a list/tuple whose first element is one (as ONNX
    Runtime returns). Returns the largest absolute difference seen, so a lesson can print it.

    >>> lin = torch.nn.Linear(3, 2).eval()
    >>> assert_same_outputs(lin, lambda x: lin(x) + 1e-7, [torch.ones(1, 3), torch.ones(4, 3)]) < 1e-6
    True
    """
    worst = 0.0
    checked = 0
    with torch.inference_mode():
        for x in inputs:
            expected = _to_tensor(reference(x)).float().cpu()
            actual = _to_tensor(candidate(x)).float().cpu()
            if expected.shape != actual.shape:
                raise AssertionError(f"input of shape {tuple(x.shape)}: output shapes differ, "
                                     f"{tuple(expected.shape)} vs {tuple(actual.shape)}")
            diff = (expected - actual).abs().max().item() if expected.numel() else 0.0
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                                       msg=functools.partial("input of shape {}: {}".format, tuple(x.shape)))
            worst = max(worst, diff)
            checked += 1
    if checked == 0:
        raise ValueError("no inputs to compare on")
    return worst


# ---------------------------------------------------------------- ONNX and ONNX Runtime



def onnx_files(path: str | Path) -> list[Path]:
    """The ``.onnx`` file and every external-data file it references: what you must ship."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    sidecars = {path.parent / next(e.value for e in tensor.external_data if e.key == "location")
                for tensor in onnx_graph_tensors(model.graph) if uses_external_data(tensor)}
    return [path, *sorted(sidecars)]


def artifact_size_bytes(path: str | Path) -> int:
    """Bytes on disk of an exported model: a file, a folder, or an ONNX model plus its sidecars."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if path.suffix == ".onnx":
        return sum(p.stat().st_size for p in onnx_files(path))
    return path.stat().st_size


def op_counts(model: Any) -> pd.Series:
    """How many nodes of each op type an ONNX graph has (top level), most common first."""
    import pandas as pd  # noqa: F811 - imported here so the service never loads pandas

    counts = Counter(node.op_type for node in model.graph.node)
    return pd.Series(dict(counts.most_common()), name="nodes", dtype="int64")


def io_signature(model: Any) -> pd.DataFrame:
    """Inputs and outputs of an ONNX graph with dtype and shape; named dims are dynamic."""
    import onnx
    import pandas as pd  # noqa: F811 - imported here so the service never loads pandas

    rows = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
            rows.append({"kind": kind, "name": value.name,
                         "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                         "shape": str(dims), "dynamic dims": ", ".join(str(d) for d in dims if isinstance(d, str))})
    return pd.DataFrame(rows).set_index("name")


def onnx_export(model: torch.nn.Module, example: torch.Tensor, path: str | Path, max_batch: int = 1024,
                input_name: str = "input", output_name: str = "logits") -> Path:
    """Export ``model`` to one self-contained ONNX file with a dynamic batch dimension (lesson 02's recipe).

    The current exporter (``dynamo=True``, ``dynamic_shapes``); the weights stay inside the file
    (``external_data=False``), so copying the file copies the model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    torch.onnx.export(model.eval(), (example,), path, dynamo=True, dynamic_shapes=({0: batch},),
                      input_names=[input_name], output_names=[output_name], external_data=False, verbose=False)
    return path


def quantize_onnx_static(fp32_path: str | Path, out_path: str | Path, calibration: torch.Tensor,
                         batch_size: int = 64, per_channel: bool = True) -> Path:
    """Static int8 (QDQ) quantization with ONNX Runtime, calibrated on real inputs (lesson 03's recipe).

    ``calibration`` is a batch of preprocessed inputs (a few hundred is plenty). Pre-processing
    (shape inference, fusion) first, as ORT recommends; activations uint8, weights int8 per channel.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: b.numpy()} for b in calibration.split(batch_size)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    prepared = out_path.with_name(out_path.stem + "_pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()
    return out_path


class OrtRunner:
    """Call an ONNX Runtime session like a model: torch tensor in, torch tensor out (first output).

    >>> callable(OrtRunner)
    True
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


# ---------------------------------------------------------------- the C++ loader

def cpp_compiler() -> str | None:
    """The C++ compiler to use (``$CXX``, else ``g++``, else ``c++``/``clang++``), or None when there is none."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def cpp_build_command(source: Path, output: Path, compiler: str = "g++", system: str | None = None) -> list[str]:
    """The one command that builds ``source`` against the libtorch inside the installed torch wheel.

    ATen's headers need C++20. On Linux (GNU ld) the ABI flag must match the wheel's, and
    ``--no-as-needed`` keeps ``libtorch_cpu`` linked although no symbol is referenced directly
    (operators register at load). macOS's linker (``ld64``, under Apple clang) keeps every library
    it is given and knows neither flag, so ``system="Darwin"`` leaves them out. (Windows needs
    MSVC and a CMake build: not covered here.)

    >>> "-Wl,--no-as-needed" in cpp_build_command(Path("a.cpp"), Path("a"), "clang++", system="Darwin")
    False
    """
    system = system or platform.system()
    root = Path(torch.__file__).resolve().parent
    command = [compiler, "-std=c++20", "-O2", str(source), "-o", str(output)]
    if system != "Darwin":
        command.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    command += [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
                f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}"]
    if system != "Darwin":
        command.append("-Wl,--no-as-needed")
    return command + ["-ltorch", "-ltorch_cpu", "-lc10"]


def build_cpp_loader(output_dir: str | Path, source: str | Path = CPP_SOURCE, force: bool = False) -> Path:
    """Compile the C++ loader into ``output_dir`` (about 20 s) and return the binary's path.

    A rebuild is skipped when the binary was built from the same source, torch version and
    command (a stamp file next to it records them). Raises ``RuntimeError`` with the compiler's
    message when the build fails, and ``FileNotFoundError`` when there is no compiler.
    """
    compiler = cpp_compiler()
    if compiler is None:
        raise FileNotFoundError("no C++ compiler found (set CXX, or install g++; on macOS: xcode-select --install)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    binary = output_dir / source.stem
    command = cpp_build_command(source, binary, compiler)
    key = hashlib.sha256(source.read_bytes() + " ".join(command).encode() + torch.__version__.encode()).hexdigest()
    stamp = output_dir / f"{source.stem}.stamp"
    if not force and binary.is_file() and stamp.is_file() and stamp.read_text() == key:
        return binary
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"C++ build failed:\n$ {shlex.join(command)}\n{result.stderr[-4000:]}")
    stamp.write_text(key)
    return binary


def run_cpp_loader(binary: str | Path, kind: str, model_path: str | Path, x: torch.Tensor,
                   workdir: str | Path) -> tuple[torch.Tensor, str]:
    """Run the C++ loader on a 4-d float32 batch; return its output tensor and what it printed."""
    if kind not in ("torchscript", "aoti"):
        raise ValueError(f"kind must be 'torchscript' or 'aoti', got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"the C++ loader takes an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inp, out = workdir / "cpp_input.bin", workdir / "cpp_output.bin"
    x.detach().cpu().float().contiguous().numpy().tofile(inp)
    out.unlink(missing_ok=True)
    command = [str(binary), kind, str(model_path), str(inp), *map(str, x.shape), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"the C++ loader failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    values = np.fromfile(out, dtype=np.float32)
    return torch.from_numpy(values.reshape(x.shape[0], -1)), result.stdout
