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
    box = ax.get_position()                                      # this Axes' share of the figure, in inches:
    width, height = box.width * ax.figure.get_size_inches()[0], box.height * ax.figure.get_size_inches()[1]
    for start, end, *label in edges:
        (x0, y0), (x1, y1) = nodes[start][:2], nodes[end][:2]
        dx, dy = (x1 - x0) * width, (y1 - y0) * height          # in inches: which sides face each other
        if abs(dx) >= 1.5 * abs(dy):                                  # mostly sideways: left and right edges
            out, into = (1.0 if dx > 0 else 0.0, 0.5), (0.0 if dx > 0 else 1.0, 0.5)
        else:
            out, into = (0.5, 1.0 if dy > 0 else 0.0), (0.5, 0.0 if dy > 0 else 1.0)
        # Anchored to the boxes' text, so the arrow runs from edge to edge whatever the box sizes.
        ax.annotate("", xy=into, xycoords=boxes[end], xytext=out, textcoords=boxes[start], zorder=2,
                    arrowprops={"arrowstyle": "-|>", "color": "#555555", "shrinkA": 5, "shrinkB": 6})
        if label:
            # Beside a slanted arrow on its outer side (arrows into one box do not cross their labels).
            side = "center" if abs(dx) < 1e-9 or abs(dy) < 1e-9 else ("right" if dx > 0 else "left")
            along = 0.5 if abs(dy) < 1e-9 else 0.45
            lx, ly = x0 + along * (x1 - x0), y0 + along * (y1 - y0)
            ax.text(lx + (0.01 if side == "left" else -0.01 if side == "right" else 0.0),
                    ly + (0.05 if abs(dy) < 1e-9 else 0.0), label[0], ha=side, va="center", fontsize=8,
                    color="#333333", zorder=4)
    if title:
        ax.set_title(title)
    return ax
