"""The course's two GitHub Actions workflows lint clean with three real linters, which catch real mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from course_utils import optional, workflows

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = [ROOT / ".github" / "workflows" / "course.yml", ROOT / "deploy" / "ci" / "release.yml"]
INJECTION = """\
name: greet
on: pull_request
jobs:
  greet:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "${{ github.event.pull_request.title }}"
"""


@pytest.mark.parametrize("linter", workflows.LINTERS)
def test_both_workflows_lint_clean(linter):
    result = getattr(workflows, linter)(WORKFLOWS)
    if result.status == "skipped":
        pytest.skip(optional.skip_line("actionlint", f"test_workflows: {linter}", result.findings[0]))
    assert result.clean, "\n".join(result.findings)


def test_the_linters_catch_injection_unpinned_actions_and_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(INJECTION)
    results = workflows.lint([bad])
    found = "\n".join(workflows.problems(results))
    assert "template-injection" in found and "unpinned-uses" in found and "excessive-permissions" in found
    if results["actionlint"].status != "skipped":
        assert "potentially untrusted" in found
    broken = tmp_path / "broken.yml"
    broken.write_text("name: x\non: push\njobs:\n  a:\n    steps: 3\n")
    results = workflows.lint([broken])
    assert results["schema"].status == "problems" and "'runs-on' is a required property" in "\n".join(
        results["schema"].findings)
    assert results["zizmor"].status == "problems" and "could not audit" in results["zizmor"].findings[0]
    lax = workflows.zizmor([broken, WORKFLOWS[0]], strict=False)
    assert lax.status == "clean", "without --strict-collection zizmor skips the broken file and passes the rest"
    assert workflows.zizmor([tmp_path / "missing.yml"]).status == "problems"


def test_the_course_workflow_runs_what_ci_runs_on_a_schedule_with_a_cached_venv():
    course = yaml.safe_load(WORKFLOWS[0].read_text())
    triggers = course[True]   # YAML 1.1 reads the key `on` as True
    assert triggers["schedule"][0]["cron"] and "pull_request" in triggers
    runs = {step.get("run") for job in course["jobs"].values() for step in job["steps"]}
    assert {"make image-check", "make test", "make test-without-tools", "make test-compat"} <= runs
    assert course["permissions"] == {"contents": "read"}
    cached = [s for s in course["jobs"]["test"]["steps"] if s.get("uses", "").startswith("actions/cache@")]
    assert cached and ".venv" in cached[0]["with"]["path"] and "constraints.txt" in cached[0]["with"]["key"]
    # every optional tool's part must run in CI, not skip (course_utils.optional)
    assert course["jobs"]["test"]["env"][optional.REQUIRE_ALL_ENV] == "1"
    assert any("apparmor_restrict_unprivileged_userns=0" in (step.get("run") or "") for step in course["jobs"]["test"]["steps"])
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"export {optional.REQUIRE_ALL_ENV}=1" in ci and "make test\n" in ci and "make test-without-tools\n" in ci


def test_the_release_workflow_gates_builds_the_image_and_publishes_the_report():
    flow = yaml.safe_load(WORKFLOWS[1].read_text())
    jobs = flow["jobs"]
    assert jobs["gate"]["needs"] == "test"
    names = [s.get("name") for s in jobs["gate"]["steps"]]
    gate = jobs["gate"]["steps"][names.index("Release gate")]
    assert "-m course_utils.release gate" in gate["run"] and "--report reports/release.json" in gate["run"]
    image = jobs["gate"]["steps"][names.index("The image of the promoted model, built, run and probed")]
    assert "image.py check" in image["run"] and names.index("Release gate") < names.index(image["name"])
    publish = jobs["gate"]["steps"][-1]
    assert publish["name"] == "Publish the report" and publish["if"] == "always()"
    assert publish["with"]["path"] == "reports/release.json"
    assert flow["concurrency"]["cancel-in-progress"] is False
