"""Write the student build: every lesson without its reference solutions and without outputs.

    python tools/student.py [SOURCE_DIR] [OUT_DIR]       # default: notebooks/ -> student/

From the same source as the graded lessons: each exercise's ``exercise-solution`` cell is
dropped, so the learner starts from the ``exercise-stub`` cell (the very cell that `make test`
proves fails the self-check) and the self-check stops the notebook there, with its message,
until the exercise is solved. Outputs and execution counts are cleared; everything else (prose,
Think! prompts, code, quizzes) is kept as it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTE = ("> **Student edition.** The reference solutions are removed and every output is cleared: run the\n"
        "> cells in order. Each *Self-check* cell stops the notebook with a message until you have solved\n"
        "> the exercise above it (edit the cell marked TODO, run it, run the self-check again). The full\n"
        "> lesson, with solutions and outputs, is in `notebooks/`; where the text mentions a collapsed\n"
        "> reference cell, that cell is not in this edition.")


def student_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` without solution cells and outputs, with a note under the title."""
    out = nbformat.from_dict(nbformat.from_dict(nb))     # a deep copy
    out.cells = [c for c in out.cells if "exercise-solution" not in c.get("metadata", {}).get("tags", [])]
    for cell in out.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    out.cells.insert(1, nbformat.v4.new_markdown_cell(NOTE, id="student-edition-note"))
    return out


def build(source: Path, target: Path) -> list[Path]:
    """Write the student version of every ``*.ipynb`` in ``source`` to ``target``; return the paths."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(source.glob("*.ipynb")):
        out = target / path.name
        nbformat.write(student_notebook(nbformat.read(path, as_version=4)), out)
        written.append(out)
    return written


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else Path("notebooks")
    target = Path(argv[1]) if len(argv) > 1 else Path("student")
    written = build(source, target)
    print(f"wrote {len(written)} student notebooks to {target}/ (solutions removed, outputs cleared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
