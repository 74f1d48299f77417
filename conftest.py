"""Repository-wide pytest hooks.

* Per-notebook runtimes in the summary of `make test` / `make check`.
* "Your turn" exercises graded two ways. Each exercise is three tagged cells: ``exercise-stub``
  (what the learner starts from), ``exercise-solution`` (the reference solution, collapsed in
  JupyterLab/Colab) and ``exercise-check`` (the self-check). nbval runs them in order like any
  cell; right after the self-check passes, the same kernel runs stub + self-check, which must
  fail with an ``AssertionError`` (a check that cannot fail is a defect), then solution +
  self-check, which must pass again, so the cells after the exercise see the solution's state.
  A failure is reported on the self-check's cell.
* The parts skipped for a missing optional tool (podman, Java, Node.js, user namespaces, a C++
  compiler, a GPU), listed at the end with how to get each tool. ``course_utils.optional`` records
  them in the file named by ``COURSE_SKIPS_FILE``, which every notebook kernel inherits; under a
  ``COURSE_REQUIRE_*`` switch a missing tool fails instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

from course_utils import optional

_NOTEBOOK_SECONDS: dict[str, float] = defaultdict(float)
NOTEBOOK_BUDGET_S = 90.0
EXERCISE_TIMEOUT_S = 300.0
_GRADED: list[str] = []


def pytest_configure(config):  # noqa: ANN001
    """Give this run (and every kernel it starts) a fresh file for the skips, unless one is set already."""
    if not os.environ.get(optional.SKIPS_ENV):
        handle, path = tempfile.mkstemp(prefix="course-skips-", suffix=".jsonl")
        os.close(handle)
        os.environ[optional.SKIPS_ENV] = path
        config._course_skips_file = path   # ours to remove at the end


def pytest_unconfigure(config):  # noqa: ANN001
    path = getattr(config, "_course_skips_file", None)
    if path:
        Path(path).unlink(missing_ok=True)
        os.environ.pop(optional.SKIPS_ENV, None)


def _skip_summary(terminalreporter) -> None:  # noqa: ANN001
    path = os.environ.get(optional.SKIPS_ENV)
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] \
        if path and Path(path).exists() else []
    terminalreporter.section("optional tools")
    if not records:
        terminalreporter.write_line("every part that needs an optional tool ran (none was skipped)")
        return
    seen: set[tuple[str, str]] = set()
    for record in records:
        if (record["tool"], record["part"]) in seen:
            continue
        seen.add((record["tool"], record["part"]))
        terminalreporter.write_line(optional.skip_line(record["tool"], record["part"], record["why"]))
    terminalreporter.write_line(f"(a skip is not a failure: {optional.REQUIRE_ALL_ENV}=1 makes every missing tool but the "
                                "GPU one, COURSE_REQUIRE_<TOOL>=1 that tool, an error; `python -m course_utils.optional` "
                                "lists the tools)")


def pytest_runtest_logreport(report):  # noqa: ANN001 - pytest hook signature
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] += report.duration


def _tags(cell) -> list[str]:  # noqa: ANN001 - an nbformat cell
    return list(cell.get("metadata", {}).get("tags", []))


def exercise_cells(cells: list, check_index: int) -> tuple[object, object]:
    """The stub and solution cells that belong to the self-check at ``check_index``.

    They are the nearest ``exercise-stub`` and ``exercise-solution`` cells before it, after the
    previous self-check.
    """
    stub = solution = None
    for cell in reversed(cells[:check_index]):
        tags = _tags(cell)
        if "exercise-check" in tags:
            break
        if "exercise-solution" in tags and solution is None:
            solution = cell
        if "exercise-stub" in tags and stub is None:
            stub = cell
    if stub is None or solution is None:
        raise LookupError(f"cell {check_index} is tagged exercise-check but has no exercise-stub and exercise-solution before it")
    return stub, solution


def _run(kernel_client, source: str) -> tuple[str | None, str]:  # noqa: ANN001
    """Run ``source`` in the notebook's kernel; return (exception name or None, what it printed)."""
    printed: list[str] = []

    def collect(msg: dict) -> None:
        content = msg.get("content", {})
        if msg.get("msg_type") == "stream":
            printed.append(content.get("text", ""))
        elif msg.get("msg_type") == "error":
            printed.append(f"{content.get('ename')}: {content.get('evalue')}")

    reply = kernel_client.execute_interactive(source, timeout=EXERCISE_TIMEOUT_S, store_history=False,
                                              allow_stdin=False, output_hook=collect)
    content = reply["content"]
    return (content.get("ename") if content.get("status") == "error" else None), "".join(printed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):  # noqa: ANN001
    result = yield
    cell = getattr(item, "cell", None)
    if cell is None or "exercise-check" not in _tags(cell):
        return result
    cells = item.parent.nb.cells
    stub, solution = exercise_cells(cells, cells.index(cell))
    client = item.parent.kernel.kc
    where = f"{item.parent.name} {item.name}"
    error, printed = _run(client, stub.source + "\n\n" + cell.source)
    if error != "AssertionError":
        raise AssertionError(f"{where}: the self-check must fail with an AssertionError when run on the stub, "
                             f"but it {'raised ' + error if error else 'passed'}: a check that cannot fail "
                             f"grades nothing.\n{printed}")
    error, printed = _run(client, solution.source + "\n\n" + cell.source)
    if error is not None:
        raise AssertionError(f"{where}: the self-check failed on a second run of the reference solution "
                             f"({error}); a learner re-runs checks, so they must be repeatable.\n{printed}")
    _GRADED.append(where)
    return result


@pytest.hookimpl(trylast=True)   # the skipped parts come last, just before pytest's own short summary
def pytest_terminal_summary(terminalreporter):  # noqa: ANN001
    if _GRADED:
        terminalreporter.section("exercises graded two ways (stub fails, solution passes)")
        for where in _GRADED:
            terminalreporter.write_line(where)
    if _NOTEBOOK_SECONDS:
        terminalreporter.section("notebook runtimes (kernel start excluded)")
        for path, seconds in sorted(_NOTEBOOK_SECONDS.items()):
            flag = "" if seconds < NOTEBOOK_BUDGET_S else f"  <-- over the {NOTEBOOK_BUDGET_S:.0f} s budget"
            terminalreporter.write_line(f"{seconds:6.1f} s  {path}{flag}")
    _skip_summary(terminalreporter)
