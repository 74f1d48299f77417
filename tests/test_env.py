import os
import sys

import pytest
import torch

from course_utils import env


def test_pick_device_falls_back_to_cpu_when_preferred_device_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert env.pick_device("cuda") == torch.device("cpu")
    assert env.pick_device("mps") == torch.device("cpu")
    assert env.pick_device() == torch.device("cpu")


def test_pick_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)   # `make test` sets it (TEST_DEVICE=cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert env.pick_device() == torch.device("cuda")
    assert env.pick_device("mps") == torch.device("mps")
    assert env.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert env.pick_device() == torch.device("mps")


def test_pick_device_reads_environment_and_rejects_unknown(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert env.pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        env.pick_device("tpu")


def test_seed_everything_makes_all_generators_repeat():
    import random

    import numpy as np

    env.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    env.seed_everything(123)
    assert first == (random.random(), np.random.rand(), torch.rand(1).item())


def test_set_threads_pins_and_validates(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert env.set_threads(1) == 1
        monkeypatch.setenv("COURSE_THREADS", "2")
        assert env.set_threads() == 2
        with pytest.raises(ValueError, match=">= 1"):
            env.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_setup_returns_device_and_pins_threads():
    before = torch.get_num_threads()
    try:
        assert env.setup(seed=1, threads=1, prefer="cpu") == torch.device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_in_colab_detects_the_colab_variable(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert env.in_colab() is False
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    assert env.in_colab() is True


def test_environment_report_has_versions_and_prints(capsys):
    report = env.print_report(torch.device("cpu"))
    assert report.torch == torch.__version__
    assert report.device == "cpu"
    assert report.onnxruntime != "not installed"
    out = capsys.readouterr().out
    assert "torch" in out and torch.__version__ in out and "threads" in out


def test_artifacts_dir_is_created_under_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ARTIFACTS", str(tmp_path / "scratch"))
    folder = env.artifacts_dir("00_setup")
    assert folder == tmp_path / "scratch" / "00_setup" and folder.is_dir()
    assert env.artifacts_dir() == tmp_path / "scratch"


def test_artifacts_default_is_ignored_by_git():
    gitignore = (env.REPO_DIR / ".gitignore").read_text().splitlines()
    assert "artifacts/" in gitignore
    assert os.path.basename(env.artifacts_dir()) == "artifacts" or "COURSE_ARTIFACTS" in os.environ


def test_reduced_precision_per_device(monkeypatch):
    assert env.reduced_precision("cuda") == torch.float16
    assert env.reduced_precision("mps") == torch.float16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert env.reduced_precision("cpu") == torch.bfloat16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert env.reduced_precision("cpu") is None


def test_configured_threads_reads_the_variable_and_rejects_garbage(monkeypatch):
    monkeypatch.delenv("COURSE_THREADS", raising=False)
    assert env.configured_threads() == env.DEFAULT_THREADS
    monkeypatch.setenv("COURSE_THREADS", "1")
    assert env.configured_threads() == 1
    monkeypatch.setenv("COURSE_THREADS", "two")
    with pytest.raises(ValueError, match="COURSE_THREADS must be a whole number"):
        env.configured_threads()


def test_cpu_features_names_x86_and_arm_flags():
    assert env.cpu_features({"flags": "sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_int8"}) == [
        "AVX2", "FMA", "AVX-512", "AVX512-BF16", "AMX", "AMX-INT8"]
    assert env.cpu_features({"Features": "fp asimd asimddp sve"}) == ["NEON", "NEON-dotprod", "SVE"]
    assert env.cpu_features({}) == []


def test_hardware_summary_and_report_name_the_cpu():
    line = env.hardware_summary()
    assert env.cpu_name() in line and f"{torch.get_num_threads()} threads in use" in line
    report = env.environment_report(torch.device("cpu"))
    assert report.cpu == env.cpu_name()
    assert report.cpu_features == (", ".join(env.cpu_features()) or "-")


def test_quantized_engine_is_supported_by_this_build():
    assert env.quantized_engine() in torch.backends.quantized.supported_engines


def test_importing_the_package_asks_openmp_not_to_spin():
    import subprocess
    import sys

    code = "import os; os.environ.pop('OMP_WAIT_POLICY', None); import course_utils; print(os.environ['OMP_WAIT_POLICY'])"
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, check=True).stdout
    assert out.strip() == "PASSIVE"


def test_show_source_gives_whole_dedented_source_with_its_module():
    from course_utils import monitoring

    code = env.show_source(monitoring.LatencyMonitor.report, env.configured_threads)
    text = code.data
    assert text.startswith("# course_utils.monitoring\ndef report(self)")        # a method, dedented
    assert "# course_utils.env\ndef configured_threads() -> int:" in text
    assert text.count("\n\n\n# ") == 1
    with pytest.raises(TypeError, match="no Python source"):
        env.show_source(len)
    with pytest.raises(ValueError, match="at least one"):
        env.show_source()


def test_show_source_of_a_file_names_it_relative_to_the_repository():
    text = env.show_source(env.REPO_DIR / "deploy" / "torchserve" / "handler.py").data
    assert text.startswith("# deploy/torchserve/handler.py\n") and "class DigitsHandler" in text


def test_capture_native_stderr_takes_what_the_descriptor_gets_and_restores_it(capfd):
    with env.capture_native_stderr() as captured:
        os.write(2, b"probe: cpu 0\n")
        print("bindings", file=sys.stderr)
    os.write(2, b"after\n")
    assert captured.text == "probe: cpu 0\nbindings\n"
    assert capfd.readouterr().err == "after\n"


def test_capture_native_stderr_restores_the_descriptor_when_the_block_raises(capfd):
    with pytest.raises(RuntimeError), env.capture_native_stderr() as captured:
        os.write(2, b"half\n")
        raise RuntimeError("boom")
    os.write(2, b"back\n")
    assert captured.text == "half\n" and capfd.readouterr().err == "back\n"
