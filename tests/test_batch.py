"""Batched decoding: every row gives exactly what it gives alone, nothing held in lockstep."""

import pytest

import mlx_mtp
from conftest import WINDOW, ContinuationProposer, load_pair, plain_greedy, prompt_of

# Different lengths; some longer than the sliding window, one 3x.
PROMPTS = [prompt_of(n, seed=20 + n) for n in (5, 3 * WINDOW + 2, 12, 3, WINDOW + 1, 9, 17, 2 * WINDOW)]


@pytest.mark.parametrize("name", ["31b", "moe", "e2b"])
@pytest.mark.parametrize("batch", [2, 4, 8])
def test_each_row_equals_its_own_greedy_run(name, batch):
    pair = load_pair(name)
    prompts = PROMPTS[:batch]
    expected = [plain_greedy(pair.target.model, p, 5 * WINDOW) for p in prompts]
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=5 * WINDOW, num_draft_tokens=3)
    assert [r.tokens for r in results] == expected
    # Proposals that are often right: rows accept different lengths every round.
    oracle = ContinuationProposer([p + e for p, e in zip(prompts, expected)], noise=0.3)
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=5 * WINDOW, num_draft_tokens=4, proposer=oracle)
    assert [r.tokens for r in results] == expected
    assert len({tuple(r.stats.accepted) for r in results}) > 1


def test_fast_row_is_not_clamped_to_slow_row():
    pair = load_pair("31b")
    fast, slow = PROMPTS[1], PROMPTS[2]
    expected = [plain_greedy(pair.target.model, p, 40) for p in (fast, slow)]
    # Knows the fast row's continuation only: the slow row's proposals are always wrong.
    oracle = ContinuationProposer([fast + expected[0]], noise=0.0)
    results = mlx_mtp.batch_generate(pair, [fast, slow], max_tokens=40, num_draft_tokens=4, proposer=oracle)
    assert [r.tokens for r in results] == expected
    fast_stats, slow_stats = results[0].stats, results[1].stats
    # Every round but the one reaching its EOS accepts all 4 drafts, while the slow row
    # accepts none in every round.
    assert fast_stats.accepted[:-1] == [4] * (fast_stats.rounds - 1) and fast_stats.rounds < 10
    assert slow_stats.accepted_tokens == 0 and slow_stats.rounds == 39


def test_rows_finish_at_different_times_and_leave_the_batch():
    pair = load_pair("moe")
    prompts = PROMPTS[:4]
    alone = [plain_greedy(pair.target.model, p, 30) for p in prompts]
    stop = alone[0][6]  # an id row 0 emits early becomes an EOS
    eos_pair = mlx_mtp.Pair(pair.target, pair.drafter, pair.tokenizer, frozenset({stop}))
    oracle = ContinuationProposer([p + e for p, e in zip(prompts, alone)], noise=0.2)
    limits = []
    for e in alone:
        cut = e.index(stop) + 1 if stop in e else len(e)
        limits.append(e[:cut])
    # (all four prompts read in the first step)
    results = mlx_mtp.batch_generate(eos_pair, prompts, max_tokens=30, num_draft_tokens=3, proposer=oracle,
                                     prefill_step_size=64)
    assert [r.tokens for r in results] == limits
    assert results[0].finish_reason == "stop"
    live = results.stats.live_rows
    assert live[0] == 4 and live[-1] < 4 and live == sorted(live, reverse=True)


def test_batch_of_one_equals_single_sequence():
    pair = load_pair("e2b")
    single = mlx_mtp.generate(pair, PROMPTS[1], max_tokens=30, num_draft_tokens=3)
    (batched,) = mlx_mtp.batch_generate(pair, [PROMPTS[1]], max_tokens=30, num_draft_tokens=3)
    assert batched.tokens == single.tokens
    assert batched.stats.accepted == single.stats.accepted
    assert batched.stats.drafts == single.stats.drafts


def test_batched_text_prompts_and_batch_stats():
    pair = load_pair("31b")
    results = mlx_mtp.batch_generate(pair, ["hello world", "a b c d e f"], max_tokens=8, num_draft_tokens=2)
    for r, prompt in zip(results, ["hello world", "a b c d e f"]):
        assert r.tokens == mlx_mtp.generate(pair, prompt, max_tokens=8, num_draft_tokens=2).tokens
        assert r.text == pair.tokenizer.decode([t for t in r.tokens if t not in pair.eos_ids])
    assert results.stats.generation_tokens == sum(len(r.tokens) for r in results)


def test_a_long_row_does_not_make_the_rows_beside_it_keep_its_positions():
    """Sliding layers drop what each row has moved past, row by row: a row 100 windows in
    leaves the short row beside it with a short buffer, and both give their solo output."""
    from mlx_mtp import Engine, GenerationRequest

    pair = load_pair("e2b")
    prompts = [prompt_of(100 * WINDOW, seed=3), prompt_of(5, seed=4)]
    lengths = [3 * WINDOW, 50 * WINDOW]  # the short row decodes while the long one is read
    expected = [plain_greedy(pair.target.model, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(pair, max_batch=2)
    rows = [engine.add(GenerationRequest(p, max_tokens=n, draft_tokens=2)) for p, n in zip(prompts, lengths)]
    while engine.waiting or engine.reading:
        engine.step()
    assert engine.rows == rows[::-1]  # the short row joined first
    sliding = [c for c in engine.cache if c.window is not None]
    assert sliding and all(c.starts[1] > 0 and c.starts[0] == 0 for c in sliding)
    assert all(c.used < 50 * WINDOW and c.keys.shape[2] < 100 * WINDOW for c in sliding)
    assert all(c.starts == [0, 0] and c.used >= 100 * WINDOW for c in engine.cache if c.window is None)
    while engine.busy:
        engine.step()
    assert [r.generated for r in rows] == expected


def test_seeded_rows_far_apart_draw_their_solo_tokens_with_the_drafter():
    """The drafter reads each row's sliding KV from that row's own start: seeded sampling
    with its drafts gives every row its solo tokens."""
    from mlx_mtp import Engine, GenerationRequest, SamplingParams

    pair = load_pair("e2b")
    prompts = [prompt_of(100 * WINDOW, seed=5), prompt_of(6, seed=6)]
    lengths = [3 * WINDOW, 50 * WINDOW]

    def run(indices):
        engine = Engine(pair, max_batch=2, proposer="mtp")
        rows = [engine.add(GenerationRequest(prompts[i], SamplingParams(1.0), max_tokens=lengths[i], seed=i,
                                             draft_tokens=2)) for i in indices]
        while engine.busy:
            engine.step()
        return [(r.generated, r.stats.accepted) for r in rows]

    together = run([0, 1])
    assert together == run([0]) + run([1])
    assert sum(map(sum, (accepted for _, accepted in together))) > 0
