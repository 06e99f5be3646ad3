"""The engine: rows join and leave between rounds, each exact and reproducible on its own;
a round or a prefill that raises leaves every conversation as it was committed."""

import mlx.core as mx
import pytest

import mlx_mtp
from conftest import MLX_LM_PREFILL, FIXTURES, PAIRS, WINDOW, ContinuationProposer, load_pair, plain_greedy, prompt_of
from mlx_mtp import Engine, GenerationRequest, SamplingParams
from mlx_mtp.engine.costs import CostModel, Costs
from test_sampling_e2e import PROMPT, goodness_of_fit

LONG = MLX_LM_PREFILL + 352  # crosses a prefill chunk and many sliding-window reallocations


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_a_short_row_beside_a_prompt_longer_than_a_prefill_chunk_equals_its_solo_run(name):
    pair = load_pair(name)
    prompts = [prompt_of(5, seed=1), prompt_of(LONG, seed=2)]
    expected = [plain_greedy(pair.target.model, p, 12) for p in prompts]
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=12, num_draft_tokens=0)
    assert [r.tokens for r in results] == expected


def test_four_rows_one_of_them_long_with_drafts_equal_their_solo_runs():
    pair = load_pair("31b")
    prompts = [prompt_of(n, seed=30 + n) for n in (7, LONG, 3, 2 * WINDOW)]
    expected = [plain_greedy(pair.target.model, p, 20) for p in prompts]
    assert [r.tokens for r in mlx_mtp.batch_generate(pair, prompts, max_tokens=20, num_draft_tokens=3)] == expected
    oracle = ContinuationProposer([p + e for p, e in zip(prompts, expected)], noise=0.3)
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=20, num_draft_tokens=3, proposer=oracle)
    assert [r.tokens for r in results] == expected


def run_engine(pair, schedule, max_batch=8):
    """schedule: (step at which to add, prompt, SamplingParams, seed, K). Returns each row's
    generated ids, rows added between rounds while others run."""
    engine = Engine(pair, max_batch=max_batch)
    rows, step = [None] * len(schedule), 0
    while engine.busy or step == 0 or any(r is None for r in rows):
        for i, (at, prompt, params, seed, k) in enumerate(schedule):
            if at == step:
                rows[i] = engine.add(GenerationRequest(prompt, params, max_tokens=24, seed=seed, draft_tokens=k))
        engine.step()
        step += 1
        assert len(engine.rows) <= max_batch
    return [r.generated for r in rows]


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
def test_rows_joining_mid_generation_equal_their_solo_runs(name):
    pair = load_pair(name)
    greedy, warm, cool = SamplingParams(), SamplingParams(1.0), SamplingParams(0.7, top_p=0.9, top_k=40)
    schedule = [
        (0, prompt_of(6, seed=1), greedy, None, 3),
        (0, prompt_of(3 * WINDOW, seed=2), warm, 11, 3),
        (3, prompt_of(4, seed=3), cool, 12, 3),
        (5, prompt_of(LONG, seed=4), greedy, None, 2),  # read in two chunks while others run
        (6, prompt_of(9, seed=5), warm, 13, 0),
        (9, prompt_of(2 * WINDOW + 1, seed=6), cool, 14, 4),
    ]
    got = run_engine(pair, schedule, max_batch=4)  # the last rows wait for a free slot
    for out, (_, prompt, p, seed, k) in zip(got, schedule):
        solo = mlx_mtp.generate(pair, prompt, max_tokens=24, temperature=p.temperature, top_p=p.top_p,
                                top_k=p.top_k, seed=seed, num_draft_tokens=k)
        assert out == solo.tokens


def test_seeded_sampled_rows_equal_their_solo_runs_whatever_shares_the_batch():
    pair = load_pair("e2b")
    prompts = [prompt_of(n, seed=40 + n) for n in (5, 12, 3 * WINDOW, 7, 2)]
    seeds = [5, 6, 7, 8, 9]
    solo = [mlx_mtp.generate(pair, p, max_tokens=20, temperature=0.9, seed=s, num_draft_tokens=2).tokens
            for p, s in zip(prompts, seeds)]
    batched = mlx_mtp.batch_generate(pair, prompts, max_tokens=20, temperature=0.9, seed=seeds, num_draft_tokens=2)
    assert [r.tokens for r in batched] == solo
    # In another company (two rows at a time, a different neighbour) the same rows again.
    again = mlx_mtp.batch_generate(pair, prompts[::-1], max_tokens=20, temperature=0.9, seed=seeds[::-1],
                                   num_draft_tokens=2, max_batch=2)
    assert [r.tokens for r in again] == solo[::-1]
    # An int seed s seeds row i with s + i; another seed gives other samples.
    assert mlx_mtp.batch_generate(pair, prompts[:2], max_tokens=20, temperature=0.9, seed=5,
                                  num_draft_tokens=2)[1].tokens == solo[1]
    other = mlx_mtp.generate(pair, prompts[2], max_tokens=20, temperature=0.9, seed=99, num_draft_tokens=2)
    assert other.tokens != solo[2]


def test_auto_draft_length_in_a_batch_follows_rows_acceptance_and_costs():
    target, drafter = PAIRS["31b"]
    pair = mlx_mtp.load(str(FIXTURES / target), str(FIXTURES / drafter))  # its own costs
    costs = CostModel.of(pair)
    # A verify of more tokens costs little here, a drafter step nothing.
    costs.measured = {b: Costs([0.1 * b, 0.1 * b + 0.01, 0.1 * b + 0.02, 0.1 * b + 0.03, 0.1 * b + 0.04], 0.0)
                  for b in (1, 2, 4)}
    prompts = [prompt_of(n, seed=50 + n) for n in (8, 13, 5)]
    expected = [plain_greedy(pair.target.model, p, 30) for p in prompts]
    oracle = ContinuationProposer([p + e for p, e in zip(prompts, expected)], noise=0.0)
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=30, proposer=oracle)  # num_draft_tokens=None: auto
    assert [r.tokens for r in results] == expected
    assert max(results.stats.draft_tokens) == pair.default_draft_tokens  # right drafts: draft long
    # Drafts that are always wrong and a verify that costs 50% more per token: the rows' live
    # acceptance turns drafting off, but for probes.
    costs.measured = {b: Costs([0.1 * b * (1 + 0.5 * n) for n in range(5)], 0.0) for b in (1, 2, 4)}
    wrong = ContinuationProposer([], noise=1.0)
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=30, proposer=wrong)
    assert [r.tokens for r in results] == expected
    k = results.stats.draft_tokens
    assert k.count(0) > len(k) / 2 and set(k) <= {0, 1, pair.default_draft_tokens}


@pytest.mark.parametrize("name", ["31b", "e2b"])
def test_sampled_rows_with_auto_draft_length_follow_the_target_distribution(name):
    pair = load_pair(name)
    params = SamplingParams(temperature=1.0)
    results = mlx_mtp.batch_generate(pair, [PROMPT] * 1000, max_tokens=3, temperature=1.0, seed=7, max_batch=64)
    assert goodness_of_fit([r.tokens for r in results], pair.target.model, params) > 1e-3
    assert len({len(d) for r in results for d in r.stats.drafts}) >= 1


def failing_after(monkeypatch, obj, method: str, calls: int, when=lambda *a: True):
    """Make obj.method raise on its `calls`-th call for which `when(args)` holds."""
    original, seen = getattr(obj, method), []

    def wrapper(*args):
        if when(*args):
            seen.append(1)
            if len(seen) == calls:
                raise RuntimeError("injected")
        return original(*args)

    monkeypatch.setattr(obj, method, wrapper)


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_an_exception_inside_a_round_leaves_the_conversation_as_committed(name, monkeypatch):
    pair = load_pair(name)
    cache = mlx_mtp.make_prompt_cache(pair)
    mlx_mtp.generate(pair, prompt_of(6, seed=1), max_tokens=10, num_draft_tokens=3, prompt_cache=cache)
    before = list(cache.tokens)
    # The third verify forward raises after the target cache was extended by its drafts.
    failing_after(monkeypatch, pair.target, "logits", 3, when=lambda h: h.shape[1] > 1)
    turn = prompt_of(2 * WINDOW, seed=2)
    with pytest.raises(RuntimeError, match="injected"):
        mlx_mtp.generate(pair, turn, max_tokens=40, num_draft_tokens=3, prompt_cache=cache)
    monkeypatch.undo()
    history = list(cache.tokens)
    assert history[: len(before) + len(turn)] == before + turn and len(history) > len(before) + len(turn)
    assert history == before + turn + plain_greedy(pair.target.model, before + turn, len(history) - len(before) - len(turn))
    nxt = prompt_of(5, seed=3)
    out = mlx_mtp.generate(pair, nxt, max_tokens=15, num_draft_tokens=3, prompt_cache=cache)
    assert out.tokens == plain_greedy(pair.target.model, history + nxt, 15)


def test_an_exception_while_reading_a_prompt_leaves_the_conversation_untouched(monkeypatch):
    pair = load_pair("e2b")
    cache = mlx_mtp.make_prompt_cache(pair)
    mlx_mtp.generate(pair, prompt_of(6, seed=1), max_tokens=10, num_draft_tokens=3, prompt_cache=cache)
    before = list(cache.tokens)
    # The second chunk of a long prompt raises, after the first was read into the cache.
    failing_after(monkeypatch, pair.target, "hidden", 2)
    with pytest.raises(RuntimeError, match="injected"):
        mlx_mtp.generate(pair, prompt_of(LONG, seed=2), max_tokens=10, prompt_cache=cache)
    monkeypatch.undo()
    assert cache.tokens == before and not cache.busy
    nxt = prompt_of(9, seed=3)
    out = mlx_mtp.generate(pair, nxt, max_tokens=15, num_draft_tokens=3, prompt_cache=cache)
    assert out.tokens == plain_greedy(pair.target.model, before + nxt, 15)


def test_a_failed_round_in_a_batch_leaves_every_row_where_it_was(monkeypatch):
    pair = load_pair("31b")
    engine = Engine(pair)
    prompts = [prompt_of(n, seed=60 + n) for n in (4, 3 * WINDOW)]
    rows = [engine.add(GenerationRequest(p, max_tokens=20, draft_tokens=3)) for p in prompts]
    for _ in range(3):
        engine.step()
    state = [(list(r.tokens), [list(c.positions) for c in engine.cache]) for r in rows]
    failing_after(monkeypatch, pair.target, "logits", 1)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    monkeypatch.undo()
    assert [(list(r.tokens), [list(c.positions) for c in engine.cache]) for r in rows] == state
    while engine.busy:  # and the batch goes on as if nothing happened
        engine.step()
    assert [r.generated for r in rows] == [plain_greedy(pair.target.model, p, 20) for p in prompts]


def test_closing_a_stream_early_keeps_what_was_committed():
    pair = load_pair("e2b")
    cache = mlx_mtp.make_prompt_cache(pair)
    prompt = prompt_of(7, seed=4)
    stream = mlx_mtp.stream_generate(pair, prompt, max_tokens=40, num_draft_tokens=2, prompt_cache=cache)
    got = [t for _, chunk in zip(range(4), stream) for t in chunk.tokens]
    stream.close()
    assert cache.tokens == prompt + got and not cache.busy
    nxt = prompt_of(3, seed=5)
    out = mlx_mtp.generate(pair, nxt, max_tokens=10, num_draft_tokens=2, prompt_cache=cache)
    assert out.tokens == plain_greedy(pair.target.model, prompt + got + nxt, 10)


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_many_conversations_continue_in_one_batch_reading_only_their_new_tokens(name):
    pair = load_pair(name)
    firsts = [prompt_of(n, seed=70 + n) for n in (5, 2 * WINDOW, 9)]
    caches = [mlx_mtp.make_prompt_cache(pair) for _ in firsts]
    mlx_mtp.batch_generate(pair, firsts, max_tokens=12, num_draft_tokens=3, prompt_caches=caches)
    histories = [list(c.tokens) for c in caches]
    for h, p in zip(histories, firsts):
        assert h == p + plain_greedy(pair.target.model, p, 12)
    seconds = [prompt_of(n, seed=80 + n) for n in (3, 6, WINDOW + 2)]
    results = mlx_mtp.batch_generate(pair, seconds, max_tokens=10, num_draft_tokens=3, prompt_caches=caches)
    for r, h, s, c in zip(results, histories, seconds, caches):
        assert r.tokens == plain_greedy(pair.target.model, h + s, 10)
        assert r.stats.prompt_tokens == len(s) and c.tokens == h + s + r.tokens


def test_a_stop_id_inside_accepted_drafts_ends_its_row_and_counts_no_draft_past_it():
    pair = load_pair("moe")
    prompts = [prompt_of(n, seed=90 + n) for n in (6, 10, 4)]
    alone = [plain_greedy(pair.target.model, p, 30) for p in prompts]
    stop = alone[0][5]  # row 0 emits it as the 6th token, inside an 8-token draft
    eos_pair = mlx_mtp.Pair(pair.target, pair.drafter, pair.tokenizer, frozenset({stop}))
    oracle = ContinuationProposer([p + e for p, e in zip(prompts, alone)], noise=0.0)
    results = mlx_mtp.batch_generate(eos_pair, prompts, max_tokens=30, num_draft_tokens=8, proposer=oracle)
    expected = [e[: e.index(stop) + 1] if stop in e else e for e in alone]
    assert [r.tokens for r in results] == expected
    first = results[0]
    assert first.finish_reason == "stop" and first.stats.rounds == 1
    # One round committed 5 tokens after the first: 5 drafts accepted, none counted past the stop id.
    assert first.stats.accepted == [5] and first.stats.drafts == [alone[0][1:6]]
    assert first.stats.mean_accepted_length == 5.0
    for r in results:  # committed per round, whatever stopped the row
        assert r.stats.mean_accepted_length * r.stats.rounds == len(r.tokens) - 1
    single = mlx_mtp.generate(eos_pair, prompts[0], max_tokens=30, num_draft_tokens=8, proposer=oracle)
    assert single.stats.accepted == [5] and single.stats.mean_accepted_length == 5.0


def test_batched_text_equals_generate_text():
    pair = load_pair("31b")
    prompts = ["hello world", "a b c d e f", "the quick brown fox"]
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=12, num_draft_tokens=2)
    for r, prompt in zip(results, prompts):
        assert r.text == mlx_mtp.generate(pair, prompt, max_tokens=12, num_draft_tokens=2).text


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([5, -1, 7], "outside the vocabulary"),
        ([5, 10**7, 7], "outside the vocabulary"),
        ([5, 1.5, 7], "must be integers"),
        ([5, True], "must be integers"),
        ([], "empty"),
    ],
)
def test_bad_token_ids_are_refused_before_they_reach_mlx(prompt, message):
    pair = load_pair("e2b")
    with pytest.raises(ValueError, match=message):
        mlx_mtp.generate(pair, prompt, max_tokens=4)
    with pytest.raises(ValueError, match=message):
        mlx_mtp.batch_generate(pair, [[5, 6], prompt], max_tokens=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=2.5), "max_tokens must be an integer"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(num_draft_tokens=1.5), "num_draft_tokens must be in"),
        (dict(num_draft_tokens=17), "num_draft_tokens must be in"),
        (dict(max_batch=0), "max_batch must be an integer >= 1"),
        (dict(max_batch=-2), "max_batch must be an integer >= 1"),
        (dict(seed=[1]), "one entry per prompt"),
    ],
)
def test_bad_batch_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mlx_mtp.batch_generate(load_pair("e2b"), [[5, 6], [7]], **{"max_tokens": 4, **kwargs})


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        mlx_mtp.generate(load_pair("e2b"), [5, 6], max_tokens=4, temperature=1.0, seed=seed)


def test_a_prompt_cache_serves_one_generation_at_a_time():
    pair = load_pair("e2b")
    cache = mlx_mtp.make_prompt_cache(pair)
    stream = mlx_mtp.stream_generate(pair, [5, 6, 7], max_tokens=8, prompt_cache=cache)
    next(stream)
    with pytest.raises(ValueError, match="in use"):
        mlx_mtp.generate(pair, [8, 9], max_tokens=4, prompt_cache=cache)
    stream.close()
    assert mlx_mtp.generate(pair, [8, 9], max_tokens=4, prompt_cache=cache).tokens


def test_rows_keep_to_their_own_positions_in_a_shared_cache():
    """Per-row bookkeeping of one layer cache: joining rows far apart, leaving, taking out."""
    from mlx_mtp.models.cache import BatchCache

    def filled(n, value, window=4):
        c = BatchCache(1, window, slack=2)
        c.update_and_fetch(mx.full((1, 1, n, 2), value), mx.full((1, 1, n, 2), value))
        return c

    a, b = filled(40, 1.0), filled(3, 2.0)
    assert a.starts == [0] and a.positions == [40]
    a.update_and_fetch(mx.full((1, 1, 300, 2), 1.0), mx.full((1, 1, 300, 2), 1.0))
    assert a.starts == [40 - 4 - 2]  # only positions no query and no rollback can reach were dropped
    with pytest.raises(RuntimeError):
        a.trim_rows([340 - 33])  # back past what the sliding layer still holds
    a.extend(b)  # a short row joins a long one: each keeps its own start, no row grows
    assert a.positions == [340, 3] and a.starts == [34, 0] and a.keys.shape[2] == 306 + BatchCache.step
    keys, _ = a.keys_and_values()
    assert keys[1, 0, :3, 0].tolist() == [2.0] * 3 and keys[0, 0, 296:306, 0].tolist() == [1.0] * 10
    mask = a.make_mask(1)  # each row sees its own last `window` positions
    assert mask[0, 0, 0].tolist().count(True) == 4 and mask[1, 0, 0, :4].tolist() == [True] * 4
    assert mask[0, 0, 0, 303:307].tolist() == [True] * 4
    new = mx.array([3.0, 4.0]).reshape(2, 1, 1, 1) * mx.ones((2, 1, 1, 2))
    a.update_and_fetch(new, new)  # rows not in step: each writes at its own slot
    keys, _ = a.keys_and_values()
    assert keys[0, 0, 306, 0].item() == 3.0 and keys[1, 0, 3, 0].item() == 4.0
    room = a.keys.shape[2]  # a chunk that needs room: each row drops what it moved past
    a.update_and_fetch(mx.zeros((2, 1, room, 2)), mx.zeros((2, 1, room, 2)))
    assert a.starts == [341 - 4 - 2, 0] and a.positions == [341 + room, 4 + room]
    keys, _ = a.keys_and_values()
    assert keys[0, 0, :6, 0].tolist() == [1.0] * 5 + [3.0] and keys[1, 0, :4, 0].tolist() == [2.0] * 3 + [4.0]
    a.trim_rows([room, room])
    short = a.extract(1)
    assert short.positions == [4] and short.keys.shape[2] == 4 and short.starts == [0]
    long = a.extract(0)
    assert long.positions == [341] and long.starts == [341 - 4 - 2] and long.keys[0, 0, :, 0].tolist()[-1] == 3.0
    a.keep_rows([1])
    assert a.positions == [4] and a.starts == [0] and a.keys.shape[0] == 1


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sampling_settings_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        mlx_mtp.generate(load_pair("e2b"), [5, 6], max_tokens=4, **{name: value})


def test_a_prompt_that_is_not_text_or_ids_is_a_value_error():
    with pytest.raises(ValueError, match="the prompt must be text or a list of token ids"):
        mlx_mtp.generate(load_pair("e2b"), None)


def test_a_pair_is_freed_once_its_user_drops_it():
    """The per-pair cost model must not keep a pair (and its weights) alive."""
    import gc
    import weakref

    from conftest import FIXTURES, PAIRS

    target, drafter = PAIRS["e2b"]
    pair = mlx_mtp.load(str(FIXTURES / target), str(FIXTURES / drafter))
    mlx_mtp.generate(pair, [5, 6, 7], max_tokens=4)
    alive = weakref.ref(pair)
    del pair
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(proposer=123), "proposer must be a name or a Proposer"),
        (dict(proposer="bogus"), "unknown proposer 'bogus'"),
        (dict(request="x"), "request must be a GenerationRequest"),
        (dict(request=mlx_mtp.GenerationRequest(), max_tokens=3), "as a request or as keywords, not both"),
        (dict(stop=5), "stop strings must be non-empty strings"),
        (dict(stop=[""]), "stop strings must be non-empty strings"),
    ],
)
def test_bad_call_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mlx_mtp.generate(load_pair("e2b"), [5, 6], **kwargs)


def test_a_request_checks_its_own_fields():
    with pytest.raises(ValueError, match="params must be SamplingParams"):
        mlx_mtp.GenerationRequest((5, 6), params="x")
    with pytest.raises(ValueError, match="token ids must be a list of integers"):
        mlx_mtp.GenerationRequest(5)
    with pytest.raises(ValueError, match="the prompt must be token ids here"):
        mlx_mtp.GenerationRequest("hello")


def test_decoding_rows_commit_every_step_while_a_long_prompt_is_read_a_chunk_at_a_time():
    pair = load_pair("e2b")
    step_size = 32
    engine = Engine(pair, max_batch=4, prefill_step_size=step_size)
    stream = engine.add(GenerationRequest(prompt_of(6, seed=1), max_tokens=200, draft_tokens=2))
    while not engine.rows:
        engine.step()
    long = engine.add(GenerationRequest(prompt_of(LONG, seed=2), max_tokens=8, draft_tokens=2))
    steps = 0
    while long not in engine.rows:
        updates = engine.step()
        steps += 1
        assert stream in [u.row for u in updates]  # the stream never waits a step
    assert steps == -(-LONG // step_size)  # one chunk a step: no more, no fewer
    for row in (stream, long):
        while row.finish_reason is None:
            engine.step()
    solo = mlx_mtp.generate(pair, prompt_of(LONG, seed=2), max_tokens=8, num_draft_tokens=2,
                            prefill_step_size=step_size)
    assert long.generated == solo.tokens == plain_greedy(pair.target.model, prompt_of(LONG, seed=2), 8)


def test_a_short_prompt_behind_a_long_one_is_read_at_its_first_turn_and_both_stay_exact():
    pair = load_pair("31b")
    engine = Engine(pair, max_batch=4, prefill_step_size=64)
    long = engine.add(GenerationRequest(prompt_of(LONG, seed=3), max_tokens=6, draft_tokens=0))
    engine.step()
    short = engine.add(GenerationRequest(prompt_of(5, seed=4), max_tokens=6, draft_tokens=0))
    engine.step()  # the long prompt's turn (it was being read): one chunk
    assert short not in engine.rows
    engine.step()  # the short prompt's turn: read whole, its first token committed
    assert short in engine.rows and long not in engine.rows
    while engine.busy:
        engine.step()
    for row, seed, n in ((long, 3, LONG), (short, 4, 5)):
        assert row.generated == plain_greedy(pair.target.model, prompt_of(n, seed=seed), 6)


def test_short_prompts_share_a_step_and_equal_prompts_are_read_in_one_forward(monkeypatch):
    pair = load_pair("e2b")
    forwards = []
    hidden = pair.target.hidden
    monkeypatch.setattr(pair.target, "hidden", lambda tokens, cache: forwards.append(tokens.shape) or hidden(tokens, cache))
    engine = Engine(pair, max_batch=8, prefill_step_size=20)
    prompts = [prompt_of(7, seed=5), prompt_of(7, seed=6), prompt_of(9, seed=7), prompt_of(30, seed=8)]
    rows = [engine.add(GenerationRequest(p, max_tokens=5, draft_tokens=0)) for p in prompts]
    engine.step()
    # Both 7-id prompts in one forward, the 9-id one beside them (16 of 20 ids); the 30-id
    # prompt's 20-id chunk does not fit in what is left, so it waits for its turn.
    assert forwards[:2] == [(2, 7), (1, 9)] and set(engine.rows) == set(rows[:3])
    monkeypatch.undo()
    while engine.busy:
        engine.step()
    for row, prompt in zip(rows, prompts):
        assert row.generated == plain_greedy(pair.target.model, prompt, 5)


def test_a_row_taken_out_while_its_prompt_is_read_leaves_the_rows_read_with_it_exact():
    pair = load_pair("moe")
    engine = Engine(pair, max_batch=4, prefill_step_size=16)
    prompts = [prompt_of(40, seed=9), prompt_of(40, seed=10), prompt_of(40, seed=11)]
    rows = [engine.add(GenerationRequest(p, max_tokens=6, draft_tokens=0)) for p in prompts]
    engine.step()  # the three are read together, a chunk in
    assert len(engine.reading) == 1 and len(engine.reading[0].rows) == 3
    engine.remove(rows[1])
    while engine.busy:
        engine.step()
    assert rows[1].generated == [] and not rows[1].conversation.busy
    for i in (0, 2):
        assert rows[i].generated == plain_greedy(pair.target.model, prompts[i], 6)


@pytest.mark.parametrize("value", [0, -3, 2.5, "64"])
def test_a_bad_prefill_step_size_is_refused(value):
    with pytest.raises(ValueError, match="prefill_step_size must be an integer >= 1"):
        mlx_mtp.generate(load_pair("e2b"), [5, 6], max_tokens=2, prefill_step_size=value)


def test_a_generation_alone_reads_its_prompt_in_mlx_lms_chunks_and_the_server_engine_in_measured_ones(monkeypatch):
    """Nothing decodes beside `generate`: the fewest forwards (mlx-lm's 2048 ids); an
    Engine with no size given (the server's) takes the measured one, smaller here."""
    pair = load_pair("e2b")
    reads = []
    real = type(pair.target).hidden

    def counted(self, tokens, cache):
        reads.append(tokens.shape[1])
        return real(self, tokens, cache)

    monkeypatch.setattr(type(pair.target), "hidden", counted)
    prompt = prompt_of(300, seed=40)
    mlx_mtp.generate(pair, prompt, max_tokens=1)
    assert reads[0] == 300 and mlx_mtp.api.PREFILL_STEP_SIZE == MLX_LM_PREFILL
    measured = CostModel.of(pair).prefill_step_size()
    assert measured < 300
    reads.clear()
    engine = Engine(pair)
    engine.add(GenerationRequest(prompt, max_tokens=1))
    while engine.busy:
        engine.step()
    assert reads[0] == measured and sum(n for n in reads if n != 1) >= 300


@pytest.mark.parametrize("length", [20, LONG])  # LONG: past a prefill chunk and cache reallocations
def test_logprobs_are_the_targets_raw_ones_for_accepted_drafts_and_bonus_tokens_alike(length):
    """From the verify forward: equal to plain mlx-lm's forward over the whole text, at
    every committed position, with the top ones in order (the request asks for 3)."""
    pair = load_pair("e2b")
    prompt = prompt_of(length, seed=41)
    expected = plain_greedy(pair.target.model, prompt, 16)
    oracle = ContinuationProposer([prompt + expected], noise=0.3)
    request = GenerationRequest(prompt, SamplingParams(), max_tokens=16, draft_tokens=3, logprobs=3)
    responses = list(mlx_mtp.stream_generate(pair, prompt, request=request, proposer=oracle))
    tokens = [t for r in responses for t in r.tokens]
    scores = [s for r in responses for s in r.logprobs]
    assert tokens == expected and len(scores) == 16 and responses[-1].stats.accepted_tokens > 0
    logits = pair.target.model(mx.array([prompt + tokens]))[0]
    reference = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i, (token, (logprob, top)) in enumerate(zip(tokens, scores)):
        assert logprob == pytest.approx(reference[len(prompt) - 1 + i, token].item(), abs=1e-4)
        assert [t for t, _ in top][0] == token and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert len(top) == 3
    with pytest.raises(ValueError, match="logprobs must be in 0..20"):
        GenerationRequest(prompt, logprobs=21)


@pytest.mark.parametrize("step, score_bytes", [(16, None), (MLX_LM_PREFILL, 4 * 512 * 100)])
def test_prompt_logprobs_are_the_targets_at_every_prompt_position(monkeypatch, step, score_bytes):
    """Echo's scores: each prompt id but the first under plain mlx-lm's forward, across
    prefill chunks (16 ids) and across the head's slices of a 2048-id chunk (100 positions
    a slice here), for two rows read together that ask for different top counts."""
    from mlx_mtp.engine import rows

    if score_bytes is not None:
        monkeypatch.setattr(rows, "SCORE_BYTES", score_bytes)
    pair = load_pair("e2b")
    prompts = [prompt_of(230, seed=42), prompt_of(230, seed=43)]
    engine = Engine(pair, prefill_step_size=step)
    wanted = [GenerationRequest(p, max_tokens=2, logprobs=n, prompt_logprobs=True) for p, n in zip(prompts, (0, 4))]
    added = [engine.add(r) for r in wanted]
    firsts = {}
    while engine.busy:
        for update in engine.step():
            firsts.setdefault(id(update.row), update)
    for row, prompt, top in zip(added, prompts, (0, 4)):
        scores = firsts[id(row)].prompt_logprobs
        logits = pair.target.model(mx.array([prompt]))[0].astype(mx.float32)
        reference = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        assert len(scores) == len(prompt) - 1
        assert [lp for lp, _ in scores] == pytest.approx(
            [reference[i, t].item() for i, t in enumerate(prompt[1:])], abs=1e-4)
        for i, (_, alternatives) in enumerate(scores):
            assert [t for t, _ in alternatives] == mx.argsort(-reference[i])[:top].tolist()
    with pytest.raises(ValueError, match="True only with logprobs"):
        GenerationRequest(prompts[0], prompt_logprobs=True)
