"""Repository-wide pytest hooks: per-notebook runtimes in the summary of `make test`."""

from __future__ import annotations

from collections import defaultdict

_NOTEBOOK_SECONDS: dict[str, float] = defaultdict(float)
NOTEBOOK_BUDGET_S = 90.0


def pytest_runtest_logreport(report):  # noqa: ANN001 - pytest hook signature
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] += report.duration


def pytest_terminal_summary(terminalreporter):  # noqa: ANN001
    if not _NOTEBOOK_SECONDS:
        return
    terminalreporter.section("notebook runtimes (kernel start excluded)")
    for path, seconds in sorted(_NOTEBOOK_SECONDS.items()):
        flag = "" if seconds < NOTEBOOK_BUDGET_S else f"  <-- over the {NOTEBOOK_BUDGET_S:.0f} s budget"
        terminalreporter.write_line(f"{seconds:6.1f} s  {path}{flag}")
