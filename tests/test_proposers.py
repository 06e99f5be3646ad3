"""The n-gram lookup and the hybrid proposer's choice of source."""

import random

import mlx_mtp
from conftest import load_pair, plain_greedy, prompt_of
from mlx_mtp.decoding.proposers import HybridProposer, MTPProposer, NGramIndex


def test_lookup_copies_what_followed_the_longest_recurring_suffix():
    history = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 1, 2, 3]
    # "1 2 3" recurs at the start (longer than "2 3", which recurs later): copy what followed it.
    assert NGramIndex().lookup(history, 3) == [9, 9, 5]
    assert NGramIndex().lookup([5, 6, 7, 8], 2) is None
    # Near the end of the history the copy is padded with its last token.
    assert NGramIndex().lookup([4, 5, 6, 4, 5], 3) == [6, 4, 5]


def scanned_lookup(history, k):
    """The definition, by a scan from the end of the history."""
    for n in range(min(4, len(history) - 1), 1, -1):
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == history[-n:]:
                follow = history[start + n : start + n + k]
                return follow + follow[-1:] * (k - len(follow))
    return None


def test_incremental_index_matches_a_scan_as_the_history_grows_or_changes():
    rng = random.Random(0)
    index = NGramIndex()
    for _ in range(3):  # a new sequence each time: the index must notice and start afresh
        history = [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        for _ in range(60):
            k = rng.randrange(1, 4)
            assert index.lookup(history, k) == scanned_lookup(history, k)
            history = history + [rng.randrange(6) for _ in range(rng.randrange(1, 4))]


def test_hybrid_uses_lookup_where_the_output_repeats_and_stays_exact():
    pair = load_pair("31b")
    prompt = prompt_of(12, seed=3)  # the fixture target's greedy output repeats itself here
    out = mlx_mtp.generate(pair, prompt, max_tokens=80, num_draft_tokens=3)
    assert out.tokens == plain_greedy(pair.target.model, prompt, 80)
    lookup = out.stats.by_source["ngram"]
    assert lookup["accepted"] > 0 and lookup["acceptance"] > out.stats.by_source["mtp"]["acceptance"]


def test_hybrid_names_the_next_source_before_the_round():
    pair = load_pair("e2b")
    hybrid = HybridProposer(MTPProposer(pair.drafter, pair.target))
    state = hybrid.new_state()
    assert hybrid.next_source(state, [3, 4, 5, 3, 4]) == "ngram"  # "3 4" recurs
    assert hybrid.next_source(state, [3, 4, 5, 6, 7]) == "mtp"
    hybrid.observe([state], ["ngram"], [0], [[9]])  # the lookup's live acceptance falls below the drafter's
    assert hybrid.next_source(state, [3, 4, 5, 3, 4]) == "mtp"
    assert hybrid.next_source(hybrid.new_state(), [3, 4, 5, 3, 4]) == "ngram"  # another row: its own


def test_an_unused_lookup_is_still_scored_and_wins_back_its_rounds():
    pair = load_pair("e2b")
    hybrid = HybridProposer(MTPProposer(pair.drafter, pair.target))
    state = hybrid.new_state()
    hybrid.observe([state], ["ngram"], [0], [[9]])  # one miss switches the lookup off
    for _ in range(3):
        state.lookup = [7, 8]  # what propose() found but did not use
        hybrid.observe([state], ["mtp"], [0], [[7]])  # the target committed the lookup's token
    assert state.rounds["ngram"] == 5 and state.hits["ngram"] == 3.5
    assert hybrid.next_source(state, [3, 4, 5, 3, 4]) == "ngram"
