"""Greedy decoding with speculation gives exactly plain mlx-lm's greedy token ids."""

import pytest

import mlx_mtp
from conftest import FIXTURES, WINDOW, ContinuationProposer, load_pair, plain_greedy, prompt_of

SHORT, LONG = prompt_of(5), prompt_of(3 * WINDOW + 3, seed=1)


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_matches_plain_for_every_draft_length(name, k):
    pair = load_pair(name)
    for prompt in (SHORT, LONG):
        expected = plain_greedy(pair.target.model, prompt, 24)
        out = mlx_mtp.generate(pair, prompt, max_tokens=24, num_draft_tokens=k)
        assert out.tokens == expected
        assert all(len(d) <= k for d in out.stats.drafts)
        # Same again with proposals that are often right: every accept length occurs.
        oracle = ContinuationProposer([prompt + expected], noise=0.3, seed=k)
        out = mlx_mtp.generate(pair, prompt, max_tokens=24, num_draft_tokens=k, proposer=oracle)
        assert out.tokens == expected


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
def test_greedy_matches_plain_past_window_many_times(name):
    pair = load_pair(name)
    expected = plain_greedy(pair.target.model, LONG, 12 * WINDOW)
    assert mlx_mtp.generate(pair, LONG, max_tokens=12 * WINDOW, num_draft_tokens=3).tokens == expected
    oracle = ContinuationProposer([LONG + expected], noise=0.2)
    out = mlx_mtp.generate(pair, LONG, max_tokens=12 * WINDOW, num_draft_tokens=5, proposer=oracle)
    assert out.tokens == expected
    assert max(out.stats.accepted) == 5 and min(out.stats.accepted) == 0


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_multi_turn_continuation_equals_one_long_greedy_run(name):
    """Turns through a prompt cache read nothing twice and give what a fresh run on the
    whole history gives, past the sliding window."""
    pair = load_pair(name)
    turns = [prompt_of(n, seed=10 + n) for n in (6, 11, 3, 2 * WINDOW)]
    cache = mlx_mtp.make_prompt_cache(pair)
    history = []
    for i, turn in enumerate(turns):
        expected = plain_greedy(pair.target.model, history + turn, 15)
        oracle = ContinuationProposer([history + turn + expected], noise=0.3, seed=i)
        out = mlx_mtp.generate(pair, turn, max_tokens=15, num_draft_tokens=4, prompt_cache=cache, proposer=oracle)
        assert out.tokens == expected
        assert out.stats.prompt_tokens == len(turn)
        history += turn + out.tokens
        assert cache.tokens == history


def test_plain_decoding_switch_matches_plain():
    pair = load_pair("31b")
    out = mlx_mtp.generate(pair, LONG, max_tokens=20, num_draft_tokens=0)
    assert out.tokens == plain_greedy(pair.target.model, LONG, 20)
    assert out.stats.drafted_tokens == 0 and out.stats.rounds == 19


def test_max_tokens_is_never_exceeded_and_eos_stops():
    pair = load_pair("e2b")
    expected = plain_greedy(pair.target.model, SHORT, 30)
    oracle = ContinuationProposer([SHORT + expected], noise=0.0)
    for n in (1, 2, 7, 13):
        out = mlx_mtp.generate(pair, SHORT, max_tokens=n, num_draft_tokens=8, proposer=oracle)
        assert out.tokens == expected[:n] and out.finish_reason == "length"
    # Make an id the target emits mid-stream an EOS: generation stops right after it.
    stop = expected[9]
    first = expected.index(stop)
    eos_pair = mlx_mtp.Pair(pair.target, pair.drafter, pair.tokenizer, frozenset({stop}))
    oracle = ContinuationProposer([SHORT + expected], noise=0.0)
    out = mlx_mtp.generate(eos_pair, SHORT, max_tokens=30, num_draft_tokens=8, proposer=oracle)
    assert out.tokens == expected[: first + 1] and out.finish_reason == "stop"


def test_multimodal_checkpoint_runs_its_language_model():
    pair = mlx_mtp.load(str(FIXTURES / "target_mm"), str(FIXTURES / "drafter_dense"))
    out = mlx_mtp.generate(pair, LONG, max_tokens=16, num_draft_tokens=3)
    assert out.tokens == plain_greedy(pair.target.model, LONG, 16)


def test_text_prompt_uses_target_tokenizer():
    pair = load_pair("31b")
    ids = pair.tokenizer.encode("hello world")
    by_text = mlx_mtp.generate(pair, "hello world", max_tokens=10, num_draft_tokens=2)
    by_ids = mlx_mtp.generate(pair, ids, max_tokens=10, num_draft_tokens=2)
    assert by_text.tokens == by_ids.tokens
    assert by_text.text == pair.tokenizer.decode([t for t in by_text.tokens if t not in pair.eos_ids])
