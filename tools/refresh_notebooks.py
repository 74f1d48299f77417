"""Re-execute notebooks in place, top to bottom, the way `make test` will compare them.

    python tools/refresh_notebooks.py notebooks/00_setup_and_model.ipynb [...]

Runs each notebook in a fresh kernel of this environment ("python3"), with the notebook's
folder as working directory (as nbval does), then normalises the metadata that would make a
committed notebook depend on the author's machine: the kernelspec, and per-cell execution
timestamps. Fails (exit 1) on the first cell that raises.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def refresh(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.get("language_info", {}).pop("version", None)
    nbformat.write(nb, path)
    return elapsed


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python tools/refresh_notebooks.py NOTEBOOK.ipynb [...]", file=sys.stderr)
        return 2
    for name in paths:
        seconds = refresh(Path(name))
        print(f"{name}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
