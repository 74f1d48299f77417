"""The package as a wheel: what `pip install .` (no -e), `pip install git+...` or Colab's plain install get.

The course itself installs editable, so nothing else would notice a module or a data file missing
from the wheel. Here the wheel is built from the repository, installed without -e into a scratch
virtual environment (the pinned dependencies are shared with it through a .pth file, so nothing is
downloaded), and used from a folder outside the repository: every module imports, the data files
pass their checksums, and the service starts and answers a digit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import requests

from course_utils.serving import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "course_utils"


def _modules() -> list[str]:
    """Every module of the source tree, as a dotted name."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # from a clean copy of what the build reads: setuptools would reuse a stale build/ folder in the repository
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("course_utils", "data"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("course_utils-*.whl")
    return path


@pytest.fixture(scope="module")
def scratch_python(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed in it (not editable); the dependencies come from this venv."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies, read from this venv's site-packages; its .pth files (the editable course_utils
    # among them) are not processed for a folder listed in a .pth, so only the wheel provides course_utils
    (site / "course_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")
               if path.relative_to(ROOT).as_posix() not in names]
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
    data = ROOT / "data"
    manifest = [line.split(maxsplit=1)[1].lstrip("*") for line in (data / "MANIFEST.sha256").read_text().splitlines()
                if line.strip()]
    for name in ["MANIFEST.sha256", *manifest]:
        assert f"course_utils/_data/{name}" in names, f"data/{name} is not in the wheel"
    assert {"course_utils/py.typed", "course_utils/cpp/run_model.cpp"} <= names


def test_a_non_editable_install_imports_everything_and_finds_its_data(scratch_python, tmp_path):
    script = (
        "import importlib, sys\n"
        f"names = {_modules()!r}\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "import course_utils\n"
        "from course_utils import data, models\n"
        "assert 'site-packages' in course_utils.__file__, course_utils.__file__\n"
        "assert data.DATA_DIR.name == '_data' and data.DATA_DIR.parent.name == 'course_utils', data.DATA_DIR\n"
        "print(len(names), data.verify_manifest(), models.checkpoint_card()['test_accuracy'])\n"
    )
    done = subprocess.run([str(scratch_python), "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    modules, files, accuracy = done.stdout.split()
    assert int(modules) == len(_modules()) and int(files) >= 17 and float(accuracy) > 0.95


def test_a_non_editable_install_serves_the_digits_model(scratch_python, tmp_path):
    helped = subprocess.run([str(scratch_python), "-m", "course_utils.serving", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert helped.returncode == 0 and "--model" in helped.stdout, helped.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen([str(scratch_python), "-m", "course_utils.serving", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=90, process=server)
        picture = ROOT / "data" / "samples" / "digit_7.png"
        answer = requests.post(f"http://127.0.0.1:{port}/predict", files={"file": picture.read_bytes()}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "seven", answer.text
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_the_data_folder_is_the_repository_s_unless_told_or_installed(tmp_path):
    probe = "from course_utils import data; print(data.DATA_DIR)"
    told = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "COURSE_DATA_DIR": str(tmp_path / "mine")})
    assert told.stdout.strip() == str(tmp_path / "mine"), told.stderr[-2000:]
    # a clone whose data/ is gone (before `make data` rebuilds it) still points at data/, never at a
    # course_utils/_data that only a wheel has
    clone = tmp_path / "clone"
    shutil.copytree(PACKAGE, clone / "course_utils", ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if key != "COURSE_DATA_DIR"}
    bare = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(clone)!r}); {probe}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert bare.stdout.strip() == str(clone / "data"), bare.stderr[-2000:]
