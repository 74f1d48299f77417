import matplotlib

matplotlib.use("Agg")

import pytest

from course_utils import figures


def test_flow_draws_every_box_and_labelled_arrow():
    ax = figures.flow({"c": (0.1, 0.5, "client", "client"), "s": (0.5, 0.5, "service", "service"),
                       "m": (0.9, 0.5, "model")}, [("c", "s", "POST"), ("s", "m")], title="path")
    assert sorted(t.get_text() for t in ax.texts if t.get_text()) == ["POST", "client", "model", "service"]
    assert len([t for t in ax.texts if t.get_text() and t.get_bbox_patch() is not None]) == 3
    assert ax.get_title() == "path"
    ax.figure.canvas.draw()                     # the arrows clip at the boxes when drawn


def test_flow_refuses_an_arrow_to_a_missing_box():
    with pytest.raises(KeyError, match=r"\['x'\]"):
        figures.flow({"a": (0.5, 0.5, "a")}, [("a", "x")])
