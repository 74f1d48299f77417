"""Broken model files fail fast and plainly: one line naming the file, the format it was taken for, and why.

``Predictor.load`` raises :class:`ModelLoadError` for each; the CLI prints that line and exits 2
before it binds the port or starts a worker; the registry refuses to promote or roll back to one.
"""

from __future__ import annotations

import functools
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from course_utils import data, export, models
from course_utils.registry import IntegrityError, ModelRegistry
from course_utils.serving import ModelLoadError, ModelSpec, Predictor, free_port


class OneNumber(nn.Module):   # an output of shape (batch,), not (batch, classes)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1)


class FiveClasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def good_onnx(tmp_path_factory) -> Path:
    return export.onnx_export(models.load_trained_cnn(), torch.zeros(2, 1, 8, 8),
                              tmp_path_factory.mktemp("good") / "digits.onnx")


def _write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def _onnx_with_spec(folder: Path, good: Path, spec: ModelSpec) -> Path:
    path = folder / "digits.onnx"
    shutil.copy(good, path)
    spec.save_next_to(path)
    return path


def _onnx_without_its_weights(folder: Path, good: Path) -> Path:
    path = folder / "external.onnx"   # weights in external.onnx.data, then "forgotten" (the chapter's Dockerfile)
    onnx.save_model(onnx.load(str(good)), str(path), save_as_external_data=True, location="external.onnx.data",
                    size_threshold=0)
    (folder / "external.onnx.data").unlink()
    return path


def _state_dict(folder: Path, change) -> Path:
    state = models.DigitsCNN().state_dict()
    change(state)
    path = folder / "cnn.pt"
    torch.save(state, path)
    return path


def _torch_save(folder: Path, name: str, thing) -> Path:
    torch.save(thing, folder / name)
    return folder / name


def _scripted(folder: Path, module: nn.Module) -> Path:
    path = folder / "scripted.pt"
    torch.jit.script(module.eval()).save(str(path))
    return path


def _zip(folder: Path, name: str) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a program")
    return path


#: name -> (make(folder, good_onnx) -> path, what it is taken for, why)
BROKEN = {
    "random bytes (.onnx)": (lambda f, g: _write(f, "random.onnx", bytes(range(256)) * 20),
                             "an ONNX model", r"onnxruntime cannot load it \(INVALID_PROTOBUF"),
    "empty file (.onnx)": (lambda f, g: _write(f, "empty.onnx", b""), "an ONNX model", "onnxruntime cannot load it"),
    "truncated ONNX": (lambda f, g: _write(f, "cut.onnx", g.read_bytes()[: g.stat().st_size // 2]),
                       "an ONNX model", "onnxruntime cannot load it"),
    "ONNX without its external data": (_onnx_without_its_weights, "an ONNX model", "onnxruntime cannot load it"),
    "ONNX, spec with another input size": (
        lambda f, g: _onnx_with_spec(f, g, ModelSpec(input_size=(28, 28))), "an ONNX model",
        r"it takes inputs of shape \('batch', 1, 8, 8\), but its spec says \(N, 1, 28, 28\)"),
    "ONNX, spec with 5 labels": (
        lambda f, g: _onnx_with_spec(f, g, ModelSpec(labels=("a", "b", "c", "d", "e"))), "an ONNX model",
        "its spec disagrees with it: field 'labels' has 5 names but the model has 10 outputs"),
    "random bytes (.pt2)": (lambda f, g: _write(f, "random.pt2", b"\x00junk" * 100),
                            r"a torch.export program or AOTInductor package \(.pt2\)", "it is not a zip archive"),
    "a zip that is no program (.pt2)": (lambda f, g: _zip(f, "other.pt2"),
                                        r"a torch.export program or AOTInductor package \(.pt2\)", "torch cannot load it"),
    "JSON named .pt": (lambda f, g: _write(f, "config.pt", b'{"lr": 0.01}'), "a state_dict of the course's DigitsCNN",
                       r"neither a TorchScript archive nor a state_dict torch.load can read \(Unsupported operand"),
    "a pickled module (.pt)": (lambda f, g: _torch_save(f, "whole.pt", models.DigitsCNN()),
                               "a state_dict of the course's DigitsCNN",
                               r"it holds a pickled course_utils.models.DigitsCNN, not only tensors"),
    "a list of tensors (.pt)": (lambda f, g: _torch_save(f, "list.pt", [torch.zeros(1)]),
                                "a state_dict of the course's DigitsCNN", "it holds a list, not a dict of tensors"),
    "state_dict missing a key": (lambda f, g: _state_dict(f, lambda s: s.pop("fc.bias")),
                                 "a state_dict of the course's DigitsCNN", "key 'fc.bias' is missing"),
    "state_dict with a wrong shape": (lambda f, g: _state_dict(f, lambda s: s.update({"fc.weight": torch.zeros(10, 9)})),
                                      "a state_dict of the course's DigitsCNN",
                                      r"'fc.weight' has shape \(10, 9\), the model's is \(10, 256\)"),
    "another model's state_dict": (lambda f, g: _torch_save(f, "linear.pt", nn.Linear(3, 4).state_dict()),
                                   "a state_dict of the course's DigitsCNN",
                                   "key 'block1.conv.weight' is missing .and 19 more.; it has 'weight' instead"),
    "TorchScript whose output is (batch,)": (lambda f, g: _scripted(f, OneNumber()), "a TorchScript archive",
                                             r"the model's output has shape \(1,\) for a batch of 1; expected \(1, classes\)"),
    "TorchScript with 5 classes": (lambda f, g: _scripted(f, FiveClasses()), "a TorchScript archive",
                                   "field 'labels' has 10 names but the model has 5 outputs"),
    "unknown suffix (.h5)": (lambda f, g: _write(f, "model.h5", b"HDF"), "a .h5 file", "unknown model format"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_model_file_is_one_line(tmp_path, good_onnx, case):
    make, kind, reason = BROKEN[case]
    path = make(tmp_path, good_onnx)
    with pytest.raises(ModelLoadError, match=reason) as error:
        Predictor.load(path, device="cpu")
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"cannot serve {path} as "), message
    assert re.search(kind, error.value.kind), (kind, error.value.kind)


def test_the_checkpoint_failing_its_manifest_is_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(data.DATA_DIR / "MANIFEST.sha256", copy)
    original = (data.DATA_DIR / models.CHECKPOINT).read_bytes()
    (copy / models.CHECKPOINT).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))   # one bit flipped
    monkeypatch.setattr(models, "checkpoint_path", functools.partial(models.checkpoint_path, data_dir=copy))
    with pytest.raises(ModelLoadError, match="as the course's checkpoint: .*changed or corrupted") as error:
        Predictor.load(device="cpu")
    assert "\n" not in str(error.value)


def test_a_fixed_batch_model_loads_but_refuses_batches_with_a_hint(tmp_path):
    static = tmp_path / "static.onnx"
    torch.onnx.export(models.load_trained_cnn(), (torch.zeros(1, 1, 8, 8),), static, dynamo=True, verbose=False)
    predictor = Predictor.load(static)              # batch 1 works: it can be served without batching
    predictor.warmup((1,))
    with pytest.raises(ModelLoadError, match=r"fails on a batch of shape \(8, 1, 8, 8\).*--max-batch-size 1"):
        predictor.warmup((1, 8))
    result = subprocess.run([sys.executable, "-m", "course_utils.serving", "--model", str(static), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--max-batch-size 1" in result.stderr


def test_good_files_still_load(good_onnx):
    assert Predictor.load(good_onnx).kind == "onnx" and Predictor.load(device="cpu").kind == "eager"


# ----------------------------------------------------------------------------- the CLI: one line, exit 2, nothing bound

CLI_CASES = [("random bytes (.onnx)", "fastapi", ["--workers", "2"]), ("random bytes (.pt2)", "fastapi", []),
             ("JSON named .pt", "flask", []), ("ONNX, spec with 5 labels", "fastapi", [])]


@pytest.mark.parametrize("case, framework, extra", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_the_cli_refuses_a_broken_model_in_one_line_before_binding(tmp_path, good_onnx, case, framework, extra):
    path = BROKEN[case][0](tmp_path, good_onnx)
    port = free_port()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "course_utils.serving", "--framework", framework, "--model", str(path),
                             "--port", str(port), *extra], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"python -m course_utils.serving: error: cannot serve {path} as "), lines
    assert time.monotonic() - started < 60
    with socket.socket() as probe:   # nothing was listening at any point that we could reach now
        assert probe.connect_ex(("127.0.0.1", port)) != 0


# ----------------------------------------------------------------------------- the registry uses the same check

def test_the_registry_refuses_to_promote_or_roll_back_to_a_broken_artifact(tmp_path, good_onnx):
    registry = ModelRegistry(tmp_path / "registry")
    registry.register(good_onnx, "v1")
    registry.register(good_onnx, "v2")
    broken = _write(tmp_path, "broken.onnx", b"\x08\x07not really onnx")
    registry.register(broken, "v3")          # registering only copies and hashes: the file is checked at promote
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it"):
        registry.promote("v3")
    assert registry.history() == [] and registry.get("v3")["stage"] == "staging"
    registry.promote("v1")
    registry.promote("v2")
    registry.path("v1", verify=False).write_bytes(b"tampered")   # production's predecessor rots on disk
    with pytest.raises(IntegrityError, match="refusing to load"):
        registry.rollback()
    assert registry.production()["version"] == "v2", "a refused rollback leaves production where it was"
    assert registry.load().kind == "onnx" and registry.load("v2").version == "v2"
