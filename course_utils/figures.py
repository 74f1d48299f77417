"""Box-and-arrow diagrams for the lessons: a request's path, a decision chart, a release flow.

One function, :func:`flow`, so that a diagram in a notebook is a short list of boxes and arrows
the learner can read and edit, not a picture file that drifts from the code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Box colours by role: what the client sees, the service's own code, the model, a refusal.
COLOURS = {"client": "#dbe9f6", "service": "#fdf2d0", "model": "#d9f0d3", "error": "#f8d7d3", "plain": "#eeeeee"}


def flow(nodes: Mapping[str, tuple[float, float, str] | tuple[float, float, str, str]],
         edges: Sequence[tuple[str, str] | tuple[str, str, str]], ax: Any = None, title: str | None = None,
         size: tuple[float, float] = (10, 3)) -> Any:
    """Draw boxes at ``(x, y)`` (axes from 0 to 1) joined by labelled arrows; return the Axes.

    ``nodes`` maps a key to ``(x, y, text)`` or ``(x, y, text, role)``, with a role of
    :data:`COLOURS`; ``edges`` are ``(from, to)`` or ``(from, to, label)``.

    >>> ax = flow({"a": (0.1, 0.5, "client", "client"), "b": (0.9, 0.5, "model", "model")}, [("a", "b", "POST")])
    >>> sorted(t.get_text() for t in ax.texts if t.get_text())
    ['POST', 'client', 'model']
    """
    import matplotlib.pyplot as plt

    unknown = sorted({key for edge in edges for key in edge[:2]} - set(nodes))
    if unknown:
        raise KeyError(f"edges name boxes that do not exist: {unknown}")
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.axis("off")
    boxes = {}
    for key, (x, y, text, *role) in nodes.items():
        colour = COLOURS[role[0] if role else "plain"]
        boxes[key] = ax.text(x, y, text, ha="center", va="center", fontsize=9, zorder=3,
                             bbox={"boxstyle": "round,pad=0.4", "facecolor": colour, "edgecolor": "#555555"})
    for start, end, *label in edges:
        (x0, y0), (x1, y1) = nodes[start][:2], nodes[end][:2]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2,   # clipped at both boxes' edges
                    arrowprops={"arrowstyle": "-|>", "color": "#555555", "shrinkA": 2, "shrinkB": 2,
                                "patchA": boxes[start].get_bbox_patch(), "patchB": boxes[end].get_bbox_patch()})
        if label:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.05, label[0], ha="center", va="bottom", fontsize=8,
                    color="#333333")
    if title:
        ax.set_title(title)
    return ax
