from pathlib import Path

import onnx
import pytest
import torch

from course_utils import data, env, export, models, optional


@pytest.fixture(scope="module")
def cnn():
    return models.load_trained_cnn()


@pytest.fixture(scope="module")
def batches():
    x, _ = data.split_tensors("test")
    return [x[:1], x[:7], x[:32]]


@pytest.fixture(scope="module")
def onnx_paths(cnn, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = (torch.zeros(2, 1, 8, 8),)
    with_sidecar, single = folder / "cnn.onnx", folder / "cnn_single.onnx"
    torch.onnx.export(cnn, example, with_sidecar, dynamo=True, dynamic_shapes={"x": {0: batch}},
                      input_names=["input"], output_names=["logits"], verbose=False)
    torch.onnx.export(cnn, example, single, dynamo=True, dynamic_shapes={"x": {0: batch}},
                      external_data=False, verbose=False)
    return with_sidecar, single


def test_assert_same_outputs_returns_worst_difference(cnn, batches):
    worst = export.assert_same_outputs(cnn, lambda x: cnn(x) + 1e-6, batches, atol=1e-5)
    assert 5e-7 < worst < 2e-6


def test_assert_same_outputs_names_the_failing_input(cnn, batches):
    def off_for_big_batches(x):
        return cnn(x) + (0.1 if len(x) > 5 else 0.0)

    with pytest.raises(AssertionError, match=r"input of shape \(7, 1, 8, 8\)"):
        export.assert_same_outputs(cnn, off_for_big_batches, batches)
    with pytest.raises(AssertionError, match="output shapes differ"):
        export.assert_same_outputs(cnn, lambda x: cnn(x)[:, :5], batches)
    with pytest.raises(ValueError, match="no inputs"):
        export.assert_same_outputs(cnn, cnn, [])
    with pytest.raises(TypeError, match="expected a tensor"):
        export.assert_same_outputs(cnn, lambda x: "nope", batches)


def test_onnx_files_lists_the_sidecar_that_must_ship(onnx_paths):
    with_sidecar, single = onnx_paths
    assert export.onnx_files(with_sidecar) == [with_sidecar, with_sidecar.with_name("cnn.onnx.data")]
    assert export.onnx_files(single) == [single]
    total = with_sidecar.stat().st_size + with_sidecar.with_name("cnn.onnx.data").stat().st_size
    assert export.artifact_size_bytes(with_sidecar) == total
    assert abs(export.artifact_size_bytes(single) - total) < 0.1 * total


def test_artifact_size_of_file_and_folder(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert export.artifact_size_bytes(tmp_path / "a") == 10
    assert export.artifact_size_bytes(tmp_path) == 15


def test_graph_inspection(onnx_paths):
    model = onnx.load(str(onnx_paths[0]))
    counts = export.op_counts(model)
    assert counts["Conv"] == 3 and "BatchNormalization" not in counts  # BN folded into the convs
    sig = export.io_signature(model)
    assert list(sig.index) == ["input", "logits"]
    assert sig.loc["input", "dynamic dims"] == "batch" and sig.loc["logits", "dtype"] == "float32"


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_ort_session_levels_agree_with_eager(onnx_paths, cnn, batches, level):
    runner = export.OrtRunner(export.ort_session(onnx_paths[1], level=level, threads=1))
    assert export.assert_same_outputs(cnn, runner, batches, atol=1e-4) < 1e-4


def test_ort_session_saves_the_optimised_graph_and_rejects_unknown_levels(onnx_paths, tmp_path):
    target = tmp_path / "optimised.onnx"
    export.ort_session(onnx_paths[1], optimized_path=target)
    assert target.is_file() and onnx.load(str(target)).graph.node
    with pytest.raises(ValueError, match="unknown optimisation level"):
        export.ort_session(onnx_paths[1], level="max")


def test_ort_session_threads_do_not_spin_unless_asked(onnx_paths):
    key = "session.intra_op.allow_spinning"
    assert export.ort_session(onnx_paths[1]).get_session_options().get_session_config_entry(key) == "0"
    assert export.ort_session(onnx_paths[1], spinning=True).get_session_options().get_session_config_entry(key) == "1"


def test_providers_are_requested_and_checked():
    assert export.ort_providers("cpu") == ["CPUExecutionProvider"]
    import onnxruntime as ort

    expected = (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    assert export.ort_providers("cuda") == [*expected, "CPUExecutionProvider"]

    class FellBack:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(RuntimeError, match="fell back"):
        export.check_providers(FellBack(), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert export.check_providers(FellBack(), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_cpp_build_command_targets_the_wheel():
    command = export.cpp_build_command(export.CPP_SOURCE, env.artifacts_dir("cpp") / "x")
    assert "-std=c++20" in command and "-ltorch_cpu" in command
    assert any(flag.startswith("-I") and flag.endswith("include") for flag in command)


@pytest.fixture(scope="module")
def cpp_binary():
    optional.skip_unless("cxx", "test_export: the C++ loader built and run")
    return export.build_cpp_loader(env.artifacts_dir("cpp"))


def test_cpp_loader_agrees_with_python_on_torchscript(cpp_binary, cnn, batches, tmp_path):
    traced = torch.jit.trace(cnn, batches[0])
    traced.save(str(tmp_path / "cnn.pt"))
    for x in batches:
        out, printed = export.run_cpp_loader(cpp_binary, "torchscript", tmp_path / "cnn.pt", x, tmp_path)
        torch.testing.assert_close(out, cnn(x).detach(), atol=1e-5, rtol=1e-5)
        assert printed.count("class") == len(x)
    stamp = cpp_binary.with_suffix(".stamp")
    before = cpp_binary.stat().st_mtime_ns
    assert export.build_cpp_loader(cpp_binary.parent) == cpp_binary  # cached: same source, same torch
    assert cpp_binary.stat().st_mtime_ns == before and stamp.is_file()


def test_cpp_loader_agrees_with_python_on_aotinductor(cpp_binary, cnn, batches, tmp_path):
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(cnn, (batches[1],), dynamic_shapes={"x": {0: batch}})
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "cnn.pt2"))
    for x in batches:
        out, _ = export.run_cpp_loader(cpp_binary, "aoti", package, x, tmp_path)
        torch.testing.assert_close(out, cnn(x).detach(), atol=1e-4, rtol=1e-4)


def test_cpp_loader_reports_errors(cpp_binary, tmp_path):
    with pytest.raises(RuntimeError, match="the C\\+\\+ loader failed"):
        export.run_cpp_loader(cpp_binary, "torchscript", tmp_path / "missing.pt", torch.zeros(1, 1, 8, 8), tmp_path)
    with pytest.raises(ValueError, match="kind must be"):
        export.run_cpp_loader(cpp_binary, "onnx", tmp_path / "m", torch.zeros(1, 1, 8, 8), tmp_path)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        export.run_cpp_loader(cpp_binary, "aoti", tmp_path / "m", torch.zeros(8, 8), tmp_path)


def test_cpp_build_failure_shows_the_compiler_message(tmp_path):
    if export.cpp_compiler() is None:
        with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler"):
            export.build_cpp_loader(tmp_path)
        return
    broken = tmp_path / "broken.cpp"
    broken.write_text("int main() { this is not C++ }\n")
    with pytest.raises(RuntimeError, match="C\\+\\+ build failed"):
        export.build_cpp_loader(tmp_path / "out", source=broken)
    assert not (tmp_path / "out" / "broken").exists()


def test_cpp_build_command_suits_the_linker_of_each_system():
    linux = export.cpp_build_command(export.CPP_SOURCE, Path("x"), "g++", system="Linux")
    mac = export.cpp_build_command(export.CPP_SOURCE, Path("x"), "clang++", system="Darwin")
    assert "-Wl,--no-as-needed" in linux and any(f.startswith("-D_GLIBCXX_USE_CXX11_ABI=") for f in linux)
    assert "-Wl,--no-as-needed" not in mac and not any(f.startswith("-D_GLIBCXX") for f in mac)
    assert mac[0] == "clang++" and mac[-3:] == ["-ltorch", "-ltorch_cpu", "-lc10"]


def test_cpp_compiler_honours_cxx(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert export.cpp_compiler() is None
    monkeypatch.delenv("CXX")
    installed = {"clang++": "/usr/bin/clang++"}                  # a Mac: Xcode's clang, no g++
    monkeypatch.setattr(export.shutil, "which", installed.get)
    assert export.cpp_compiler() == "/usr/bin/clang++"
    installed["g++"] = "/usr/bin/g++"
    assert export.cpp_compiler() == "/usr/bin/g++"                # g++ first where both exist
    installed.clear()
    assert export.cpp_compiler() is None
