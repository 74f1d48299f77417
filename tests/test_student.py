"""The student build (`make student`): solutions out, outputs cleared, stubs that are the graded ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import exercise_cells  # noqa: E402 - the grader's own pairing of stub and self-check

spec = importlib.util.spec_from_file_location("student_build", ROOT / "tools" / "student.py")
student = importlib.util.module_from_spec(spec)
spec.loader.exec_module(student)
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    written = student.build(ROOT / "notebooks", out)
    assert [p.name for p in written] == [p.name for p in LESSONS]
    return out


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_the_student_build_keeps_the_graded_stubs_and_drops_solutions_and_outputs(build, lesson):
    source = nbformat.read(lesson, as_version=4)
    built = nbformat.read(build / lesson.name, as_version=4)
    assert not [c for c in built.cells if "exercise-solution" in _tags(c)], "a solution was left in"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in built.cells if c.cell_type == "code")
    checks = [i for i, c in enumerate(source.cells) if "exercise-check" in _tags(c)]
    built_checks = [i for i, c in enumerate(built.cells) if "exercise-check" in _tags(c)]
    assert len(built_checks) == len(checks)
    assert checks or lesson.name == "99_capstone.ipynb", "every lesson has exercises (the capstone is graded by its gates)"
    for source_index, built_index in zip(checks, built_checks, strict=True):
        graded_stub, _ = exercise_cells(source.cells, source_index)     # the stub `make test` proves fails
        previous = max([i for i in built_checks if i < built_index], default=-1)
        stubs = [c for c in built.cells[previous + 1:built_index] if "exercise-stub" in _tags(c)]
        assert len(stubs) == 1 and stubs[0].source == graded_stub.source, f"cell {built_index}: not the graded stub"
        assert built.cells[built_index].source == source.cells[source_index].source
    kept = [c.source for c in source.cells if "exercise-solution" not in _tags(c)]
    assert [c.source for c in built.cells if c.get("id") != "student-edition-note"] == kept, "prose or code was changed"


def test_a_student_notebook_runs_until_the_first_unsolved_exercise_and_says_why(build):
    nb = nbformat.read(build / "00_setup_and_model.ipynb", as_version=4)
    first_check = next(i for i, c in enumerate(nb.cells) if "exercise-check" in _tags(c))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(build)}})
    with pytest.raises(CellExecutionError) as failure:
        client.execute()
    ran = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count") is not None]
    assert max(ran) == first_check, f"stopped at cell {max(ran)}, the first self-check is cell {first_check}"
    errors = [o for o in nb.cells[first_check].outputs if o.get("output_type") == "error"]
    assert errors and errors[0]["ename"] == "AssertionError", errors
    assert errors[0]["evalue"], "the self-check must say what is wrong"
    assert "AssertionError" in str(failure.value)
