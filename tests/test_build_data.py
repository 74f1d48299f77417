"""The one rebuild command reproduces the committed data: same splits, same accuracy."""

import json

from course_utils import build_data, data, models


def test_rebuild_from_scratch_matches_the_committed_data(tmp_path):
    card = build_data.build(tmp_path)
    committed = data.read_manifest()
    rebuilt = data.read_manifest(tmp_path)
    assert set(rebuilt) == set(committed)
    # Splits and samples depend only on scikit-learn, NumPy and Pillow: byte-identical.
    for name in committed:
        if not name.startswith("checkpoints/"):
            assert rebuilt[name] == committed[name], name
    # Training is seeded and single-threaded: same accuracy as the committed card.
    assert card["test_accuracy"] == models.checkpoint_card()["test_accuracy"]
    assert card["test_accuracy"] >= 0.97
    assert json.loads((tmp_path / models.CHECKPOINT_CARD).read_text()) == card
