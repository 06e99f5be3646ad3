"""The training script's view of the hybrid: where its loss says the lookup takes over."""

import random
import sys
from pathlib import Path

import numpy as np

from mlx_mtp.proposers import NGramIndex

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_drafter import lookup_matches  # noqa: E402


def test_lookup_mask_is_where_the_runtime_lookup_proposes():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        mask = lookup_matches(np.array(tokens))
        index = NGramIndex()  # grows with the history, as in a generation
        expected = [index.lookup(tokens[: p + 1], 1) is not None for p in range(len(tokens))]
        assert mask.tolist() == expected
    assert lookup_matches(np.array([5, 6, 5, 6, 7, 6, 7])).tolist() == [False] * 3 + [True, False, False, True]
