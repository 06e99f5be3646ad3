"""The training script's view of the hybrid: where its loss says the lookup takes over."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_drafter import lookup_matches  # noqa: E402


def test_lookup_mask_marks_positions_after_a_recurring_bigram():
    # Position p is marked when tokens[p - 1 : p + 1] occurred earlier with a token after it:
    # "5 6" at p=3 (seen at 0-1, followed by 5), "6 7" at p=6 (seen at 3-4, followed by 6).
    assert lookup_matches(np.array([5, 6, 5, 6, 7, 6, 7])).tolist() == [False] * 3 + [True, False, False, True]
    assert not lookup_matches(np.array([1, 2, 3, 4, 5])).any()
