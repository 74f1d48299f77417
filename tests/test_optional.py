"""course_utils.optional: a missing tool is skipped out loud, or fails under its switch; tools/without_tools.py hides tools."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils import optional

ROOT = Path(__file__).resolve().parents[1]


def _without_tools():
    spec = importlib.util.spec_from_file_location("without_tools", ROOT / "tools" / "without_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_switches(monkeypatch, tmp_path):
    for tool in optional.TOOLS.values():
        monkeypatch.delenv(tool.switch, raising=False)
    monkeypatch.delenv(optional.REQUIRE_ALL_ENV, raising=False)
    monkeypatch.setenv(optional.SKIPS_ENV, str(tmp_path / "skips.jsonl"))
    monkeypatch.setattr(optional, "_SKIPPED", [])
    monkeypatch.setattr(optional, "_cached_problem", lambda key: "it is not here" if key == "java" else None)


def test_a_present_tool_runs_its_part_and_records_nothing(no_switches, capsys):
    assert optional.use("engine", "a part") is True
    assert capsys.readouterr().out == "" and optional.skipped() == []


def test_a_missing_tool_is_skipped_out_loud_and_recorded(no_switches, capsys):
    assert optional.use("java", "lesson 07: TorchServe") is False
    line = capsys.readouterr().out.strip()
    assert line == "skipped: lesson 07: TorchServe (it is not here; sudo apt-get install openjdk-17-jre-headless)"
    assert optional.skipped() == [{"tool": "java", "part": "lesson 07: TorchServe", "why": "it is not here"}]


@pytest.mark.parametrize("switch", ["COURSE_REQUIRE_JAVA", optional.REQUIRE_ALL_ENV])
def test_a_missing_tool_fails_under_its_switch_or_require_all(no_switches, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    with pytest.raises(optional.MissingTool, match=f"lesson 07: TorchServe needs Java 17.*{switch}=1 requires it"):
        optional.use("java", "lesson 07: TorchServe")
    assert optional.skipped() == []


def test_require_all_leaves_the_gpu_optional(no_switches, monkeypatch):
    monkeypatch.setenv(optional.REQUIRE_ALL_ENV, "1")
    assert all(optional.required(key) for key in optional.TOOLS if key != "gpu") and not optional.required("gpu")
    monkeypatch.setenv("COURSE_REQUIRE_GPU", "1")
    assert optional.required("gpu")


def test_a_given_reason_overrides_the_probe(no_switches, capsys):
    assert optional.use("cxx", "lesson 01: the C++ loader", why="the build failed on Darwin") is False
    assert "(the build failed on Darwin;" in capsys.readouterr().out


def test_skip_unless_skips_a_test_and_unknown_tools_are_refused(no_switches):
    with pytest.raises(pytest.skip.Exception, match="skipped: a test .it is not here"):
        optional.skip_unless("java", "a test")
    optional.skip_unless("engine", "a test")   # present: returns
    with pytest.raises(KeyError, match="unknown optional tool 'podman'"):
        optional.problem("podman")


def test_the_report_command_fails_when_a_required_tool_is_missing(tmp_path):
    env = {**os.environ, "COURSE_REQUIRE_GPU": "1"}   # no CUDA device on the course's CI machine
    done = subprocess.run([sys.executable, "-m", "course_utils.optional"], capture_output=True, text=True, env=env,
                          timeout=120)
    if "gpu         yes" in done.stdout:
        pytest.skip("this machine has a GPU")
    assert done.returncode == 1 and "required but missing: gpu" in done.stderr
    assert "COURSE_REQUIRE_GPU=1: required" in done.stdout


def test_shadow_path_hides_the_programs_and_keeps_everything_else(tmp_path):
    tool_dir, venv_bin = tmp_path / "usr-bin", tmp_path / "venv-bin"
    for folder, names in ((tool_dir, ["java", "podman", "ls"]), (venv_bin, ["python"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = _without_tools().shadow_path(f"{venv_bin}{os.pathsep}{tool_dir}", {"java", "podman"}, scratch)
    assert path.split(os.pathsep)[0] == str(venv_bin), "a folder without hidden programs stays as it is"
    assert shutil.which("java", path=path) is None and shutil.which("podman", path=path) is None
    assert Path(shutil.which("ls", path=path)).resolve() == (tool_dir / "ls").resolve()


def test_without_tools_hides_for_real_and_checks_each_tool_was_skipped():
    hidden = subprocess.run([sys.executable, str(ROOT / "tools" / "without_tools.py"), "--hide", "java", "--",
                             sys.executable, "-c", "import shutil; assert shutil.which('java') is None"],
                            capture_output=True, text=True, timeout=120)
    # the command passed, but nothing recorded a skip of java: the harness must say so and fail
    assert hidden.returncode == 1 and "nothing was skipped for the hidden tool 'java'" in hidden.stderr
    used = subprocess.run([sys.executable, str(ROOT / "tools" / "without_tools.py"), "--hide", "java", "--",
                           sys.executable, "-c", "from course_utils import optional; "
                           "assert not optional.use('java', 'a part')"], capture_output=True, text=True, timeout=120)
    assert used.returncode == 0 and "OK: exit 0; skipped parts: 1 for java" in used.stderr, used.stderr
    required = subprocess.run([sys.executable, str(ROOT / "tools" / "without_tools.py"), "--hide", "java",
                               "--expect-fail", "--", "COURSE_REQUIRE_JAVA=1", sys.executable, "-c",
                               "from course_utils import optional; optional.use('java', 'a part')"],
                              capture_output=True, text=True, timeout=120)
    assert required.returncode == 0 and "MissingTool" in required.stdout and "as expected" in required.stderr
    other = subprocess.run([sys.executable, str(ROOT / "tools" / "without_tools.py"), "--hide", "java",
                            "--expect-fail", "--", sys.executable, "-c", "raise SystemExit(3)"],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "not with MissingTool: something else broke first" in other.stderr
    unseen = subprocess.run([sys.executable, str(ROOT / "tools" / "without_tools.py"), "--hide", "java",
                             "--expect-part", "lesson 07: TorchServe", "--", sys.executable, "-c",
                             "from course_utils import optional; assert not optional.use('java', 'a part')"],
                            capture_output=True, text=True, timeout=120)
    assert unseen.returncode == 1 and "the part 'lesson 07: TorchServe' was not skipped" in unseen.stderr


def test_make_names_the_apt_package_when_venv_cannot_be_made(tmp_path):
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy2(ROOT / name, tmp_path / name)
    fake = tmp_path / "python-without-ensurepip"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in *ensurepip*) exit 1;; esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    done = subprocess.run(["make", "setup", f"PYTHON={fake}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert done.returncode != 0 and not (tmp_path / ".venv").exists()
    assert f"cannot create a virtual environment (no ensurepip): on Debian/Ubuntu, sudo apt-get install python{minor}-venv" \
        in done.stderr and "Traceback" not in done.stderr
    other = tmp_path / "python-3.9"
    other.write_text("#!/bin/sh\ncase \"$*\" in *version_info*) exit 1;; *python_version*) echo 3.9.18;; esac\n")
    other.chmod(0o755)
    done = subprocess.run(["make", "setup", f"PYTHON={other}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "is Python 3.9.18; the course supports 3.11 and 3.12" in done.stderr
