"""Structured output: a grammar masks the target at every verified position, its forced ids
are drafted with certainty, drafts it forbids are cut, and the output is what the target
decoding alone under the same grammar gives (greedy: the same ids; sampled: its
distribution). The reference decodes with plain mlx-lm and llguidance's own matcher."""

import json
import math

import llguidance
import llguidance.numpy
import mlx.core as mx
import numpy as np
import pytest

import mlx_mtp
from conftest import ContinuationProposer, NoisyTargetProposer, load_pair, plain_greedy, prompt_of
from mlx_mtp import GenerationRequest, SamplingParams
from mlx_mtp.decoding.grammar import grammar_tokenizer, json_grammar
from mlx_mtp.decoding.sampling import log_probs
from test_sampling_e2e import goodness_of_fit

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 6},
        "where": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
            "required": ["x", "tags"],
            "additionalProperties": False,
        },
    },
    "required": ["ok", "n", "color", "name", "where"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def pair():
    return load_pair("e2b")


def matcher(pair, grammar):
    return llguidance.LLMatcher(grammar_tokenizer(pair.tokenizer, pair.target.vocab_size, pair.eos_ids), grammar)


def allowed_now(m, vocab_size) -> np.ndarray:
    bits = llguidance.numpy.allocate_token_bitmask(1, vocab_size)
    llguidance.numpy.fill_next_token_bitmask(m, bits)
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class GrammarProcessor:
    """An mlx-lm logits processor: the target alone, masked by llguidance step by step."""

    def __init__(self, pair, grammar, prompt_length):
        self.m, self.seen, self.vocab = matcher(pair, grammar), prompt_length, pair.target.vocab_size

    def __call__(self, tokens, logits):
        new = tokens.tolist()[self.seen :]
        self.seen += len(new)
        for token in new:
            if not self.m.is_stopped():  # (complete: only EOS is left, and mlx-lm steps once past it)
                assert self.m.consume_token(token), self.m.get_error()
        return mx.where(mx.array(allowed_now(self.m, self.vocab)), logits, -mx.inf)


def constrained_plain(pair, prompt, grammar, max_tokens):
    return plain_greedy(pair.target.model, prompt, max_tokens, eos=pair.eos_ids,
                        logits_processors=[GrammarProcessor(pair, grammar, len(prompt))])


def valid(text) -> bool:
    value = json.loads(text)
    where = value["where"]
    return (set(value) == set(SCHEMA["required"]) and isinstance(value["ok"], bool) and 0 <= value["n"] <= 99
            and value["color"] in ("red", "green", "blue") and len(value["name"]) <= 6
            and set(where) == {"x", "tags"} and 0 <= where["x"] <= 9 and len(where["tags"]) <= 3
            and set(where["tags"]) <= {"a", "b"})


@pytest.mark.parametrize("proposer, k", [("hybrid", None), ("hybrid", 3), ("oracle", 4)])
def test_greedy_json_equals_the_target_alone_under_the_same_grammar(pair, proposer, k):
    grammar = json_grammar(SCHEMA)
    for seed in range(3):
        prompt = prompt_of(9, seed=60 + seed)
        expected = constrained_plain(pair, prompt, grammar, 90)
        if proposer == "oracle":  # most drafts right, some wrong (token 4: the grammar never allows it)
            proposer = ContinuationProposer([prompt + expected], noise=0.3, seed=seed)
        request = GenerationRequest(prompt, max_tokens=90, draft_tokens=k, grammar=grammar)
        out = mlx_mtp.generate(pair, prompt, request=request, proposer=proposer)
        assert out.tokens == expected and out.finish_reason == "stop" and valid(out.text)
        grammar_rounds = out.stats.by_source["grammar"]
        assert grammar_rounds["acceptance"] == 1.0 and grammar_rounds["drafted"] >= 20  # keys and punctuation


def test_k_zero_is_plain_constrained_decoding_without_forced_drafts(pair):
    grammar = json_grammar(SCHEMA)
    prompt = prompt_of(9, seed=65)
    out = mlx_mtp.generate(pair, prompt, request=GenerationRequest(prompt, max_tokens=90, draft_tokens=0,
                                                                   grammar=grammar))
    assert out.tokens == constrained_plain(pair, prompt, grammar, 90)
    assert out.stats.drafted_tokens == 0 and out.stats.rounds == len(out.tokens) - 1


def test_drafts_the_grammar_forbids_never_reach_the_target(pair, monkeypatch):
    """Every verified draft is one the grammar allows: the oracle's wrong drafts (id 4) are
    cut before the forward."""
    from mlx_mtp.decoding import round as round_module

    grammar = json_grammar(SCHEMA)
    prompt = prompt_of(9, seed=70)
    expected = constrained_plain(pair, prompt, grammar, 90)
    verified = []
    real = round_module.accept

    def spy(logits, proposal, counts, *args):
        verified.extend(t for row, n in zip(proposal.tokens.tolist(), counts) for t in row[:n])
        return real(logits, proposal, counts, *args)

    monkeypatch.setattr(round_module, "accept", spy)
    oracle = ContinuationProposer([prompt + expected], noise=0.5, seed=1)
    request = GenerationRequest(prompt, max_tokens=90, draft_tokens=4, grammar=grammar)
    out = mlx_mtp.generate(pair, prompt, request=request, proposer=oracle)
    assert out.tokens == expected and verified and 4 not in verified
    assert out.stats.by_source["oracle"]["drafted"] > 0  # the oracle's right drafts were verified


def test_a_batch_of_constrained_and_free_rows_gives_each_row_its_solo_output(pair):
    grammar = json_grammar(SCHEMA)
    prompts = [prompt_of(9, seed=80 + i) for i in range(4)]
    requests = [GenerationRequest(p, max_tokens=40, draft_tokens=3, grammar=grammar if i % 2 == 0 else None)
                for i, p in enumerate(prompts)]
    engine = mlx_mtp.Engine(pair)
    rows = [engine.add(r) for r in requests]
    while engine.busy:
        engine.step()
    for row, request, prompt in zip(rows, requests, prompts):
        alone = mlx_mtp.generate(pair, prompt, request=request)
        assert row.generated == alone.tokens
        if request.grammar is not None:
            assert row.generated == constrained_plain(pair, prompt, grammar, 40)


def masked_probability(pair, prompt, grammar, sequence, params) -> float:
    """A continuation's probability under the target's distribution masked by the grammar."""
    m = matcher(pair, grammar)
    logits = pair.target.model(mx.array([prompt + list(sequence)]))[0, len(prompt) - 1 :]
    total = 0.0
    for i, token in enumerate(sequence):
        masked = mx.where(mx.array(allowed_now(m, pair.target.vocab_size)), logits[i], -mx.inf)
        total += log_probs(masked[None], params)[0, token].item()
        m.consume_token(token)
    return math.exp(total)


def test_sampled_rows_follow_the_targets_constrained_distribution(pair):
    """Speculative sampling under the grammar draws from the masked target: chi-square of
    the sampled values against their exact masked probabilities."""
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "cyan"]}, "n": {
        "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["color", "n"], "additionalProperties": False}
    grammar = json_grammar(schema)
    prompt, params = prompt_of(11, seed=3), SamplingParams(1.0)
    drafter = NoisyTargetProposer(pair.target.model, noise=1.0)
    request = GenerationRequest((), params, max_tokens=30, draft_tokens=3, grammar=grammar)
    results = mlx_mtp.batch_generate(pair, [prompt] * 300, seed=5, request=request, proposer=drafter)
    samples = [tuple(r.tokens) for r in results]
    assert all(json.loads(r.text)["color"] in ("red", "green", "blue", "cyan") for r in results)
    assert len(set(samples)) >= 4  # (several values drawn, not one)
    masked = lambda seqs: [masked_probability(pair, prompt, grammar, s, params) for s in seqs]
    assert goodness_of_fit(samples, pair.target.model, params, prompt, masked) > 1e-3


def test_a_schema_the_library_cannot_compile_is_a_value_error(pair):
    grammar = json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})
    with pytest.raises(ValueError, match="cannot be compiled"):
        mlx_mtp.Engine(pair).add(GenerationRequest(prompt_of(5), grammar=grammar))
    with pytest.raises(ValueError, match="must be an llguidance grammar"):
        GenerationRequest(prompt_of(5), grammar={"type": "object"})


def test_a_grammar_engine_failure_ends_its_row_with_error_and_not_the_rows_beside_it(pair):
    """An allowed id can pass one of llguidance's limits (here its 2,000 Earley items in a
    row, on a very ambiguous grammar after ~220 ids): that row ends, finish_reason "error",
    instead of committing an EOS as if the grammar were complete; a free row beside it goes on."""
    from mlx_lm.sample_utils import make_logits_processors

    ambiguous = llguidance.LLMatcher.grammar_from_lark('start: x*\nx: y | y y | y y y\ny: "a" | "a" "a" | z\nz: "a"+')
    params = SamplingParams(temperature=0.0, logits_processors=make_logits_processors({1: -100.0}))  # no EOS
    prompt = prompt_of(9)
    request = GenerationRequest(prompt, params=params, max_tokens=400, grammar=ambiguous, draft_tokens=2)
    with pytest.warns(UserWarning, match="Current row has 20.. items"):
        out = mlx_mtp.generate(pair, prompt, request=request)
    assert out.finish_reason == "error" and 100 < len(out.tokens) < 400 and set(out.text) == {"a"}
    assert 1 not in out.tokens  # (no EOS committed as if the grammar were done)
    free = GenerationRequest(prompt_of(9, seed=3), max_tokens=300, draft_tokens=2)
    engine = mlx_mtp.Engine(pair)
    failing, beside = engine.add(request), engine.add(free)
    while engine.busy:
        engine.step()
    assert failing.finish_reason == "error" and "items" in failing.error and failing.generated == out.tokens
    assert beside.finish_reason == "length" and beside.generated == mlx_mtp.generate(pair, free.prompt, request=free).tokens
