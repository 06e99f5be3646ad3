"""What an mlx-lm user expects: max_tokens=-1, top_p=0, stop ids, the end of the context, BOS."""

import json
import math
import shutil
from collections import Counter
from dataclasses import replace

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer
from mlx_lm.utils import load_config

import mlx_mtp
from conftest import FIXTURES, ContinuationProposer, load_pair, plain_greedy, prompt_of
from mlx_mtp.request import encode
from mlx_mtp.decoding.sampling import SamplingParams, log_probs

CONTEXT = 4096  # the fixtures' max_position_embeddings


def test_max_tokens_minus_one_runs_to_the_stop_id():
    pair = mlx_mtp.load(str(FIXTURES / "target_31b"), str(FIXTURES / "drafter_dense"))
    prompt = prompt_of(9, seed=11)
    text = plain_greedy(pair.target.model, prompt, 200)
    stop = next(t for i, t in enumerate(text) if i >= 60 and t not in text[:i])  # a stop id the text reaches
    pair = replace(pair, eos_ids=pair.eos_ids | {stop})
    expected = plain_greedy(pair.target.model, prompt, 200, eos=pair.eos_ids)
    out = mlx_mtp.generate(pair, prompt, max_tokens=-1, num_draft_tokens=2)
    assert out.tokens == expected and expected[-1] == stop and out.finish_reason == "stop"


def test_max_tokens_minus_one_ends_at_the_context_and_says_so():
    pair = load_pair("31b")
    prompt = prompt_of(CONTEXT - 5, seed=12)
    out = mlx_mtp.generate(pair, prompt, max_tokens=-1, num_draft_tokens=2)
    assert len(out.tokens) == 5 and out.finish_reason == "context"
    # max_tokens past what the context leaves: the same end, the same reason.
    out = mlx_mtp.generate(pair, prompt, max_tokens=10, num_draft_tokens=2)
    assert len(out.tokens) == 5 and out.finish_reason == "context"
    out = mlx_mtp.generate(pair, prompt, max_tokens=5, num_draft_tokens=2)
    assert out.finish_reason == "length"  # the limit asked for, which the context also allows
    with pytest.raises(ValueError, match="or -1 for no limit"):
        mlx_mtp.generate(pair, prompt, max_tokens=-2)


def test_top_p_zero_is_off_as_in_mlx_lm():
    assert SamplingParams(1.0, top_p=0.0) == SamplingParams(1.0, top_p=1.0)
    pair = load_pair("e2b")
    prompt = prompt_of(7, seed=2)
    off = mlx_mtp.generate(pair, prompt, max_tokens=12, temperature=1.0, top_p=0.0, seed=3, num_draft_tokens=2)
    full = mlx_mtp.generate(pair, prompt, max_tokens=12, temperature=1.0, top_p=1.0, seed=3, num_draft_tokens=2)
    assert off.tokens == full.tokens
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        SamplingParams(1.0, top_p=-0.1)


def test_stop_ids_are_generation_configs_list_as_mlx_lm_takes_them(tmp_path):
    target = tmp_path / "target"
    shutil.copytree(FIXTURES / "target_31b", target)
    config = json.loads((target / "config.json").read_text())
    config["eos_token_id"] = [1, 106]
    (target / "config.json").write_text(json.dumps(config))
    generation = json.loads((target / "generation_config.json").read_text())
    generation["eos_token_id"] = [1, 50]
    (target / "generation_config.json").write_text(json.dumps(generation))
    pair = mlx_mtp.load(str(target), str(FIXTURES / "drafter_dense"))
    wrapper = mlx_lm_load_tokenizer(target, eos_token_ids=load_config(target).get("eos_token_id"))
    assert pair.eos_ids == wrapper.eos_token_ids
    assert 50 in pair.eos_ids and 106 not in pair.eos_ids
    # Without generation_config.json's list, config.json's.
    del generation["eos_token_id"]
    (target / "generation_config.json").write_text(json.dumps(generation))
    pair = mlx_mtp.load(str(target), str(FIXTURES / "drafter_dense"))
    assert 106 in pair.eos_ids and 50 not in pair.eos_ids


def test_string_turns_add_bos_once_and_equal_a_fresh_run_on_the_whole_conversation():
    # mlx-lm adds BOS to every string prompt; a conversation has one BOS, at its start.
    pair = load_pair("e2b")
    bos = pair.tokenizer.bos_token_id
    cache = mlx_mtp.make_prompt_cache(pair)
    history = []
    for turn in ["Hello there.", " How are you?", " Tell me more."]:
        ids = encode(pair.tokenizer, turn, first=not history)
        expected = mlx_mtp.generate(pair, history + ids, max_tokens=10, num_draft_tokens=0).tokens
        out = mlx_mtp.generate(pair, turn, max_tokens=10, num_draft_tokens=3, prompt_cache=cache)
        assert out.tokens == expected
        history += ids + out.tokens
        assert cache.tokens == history
    assert history.count(bos) == 1 and history[0] == bos


def penalties():
    """mlx-lm's processors: a logit bias and a repetition penalty over the last 20 ids."""
    return make_logits_processors(logit_bias={7: 2.0, 9: -5.0}, repetition_penalty=1.6, repetition_context_size=20)


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_logits_processors_equals_mlx_lm_with_them(name, k):
    pair = load_pair(name)
    prompt = prompt_of(14, seed=k)
    expected = plain_greedy(pair.target.model, prompt, 30, logits_processors=penalties())
    assert expected != plain_greedy(pair.target.model, prompt, 30), "the processors change the greedy text"
    out = mlx_mtp.generate(pair, prompt, max_tokens=30, num_draft_tokens=k, logits_processors=penalties())
    assert out.tokens == expected  # the drafter's own drafts, processed as q
    oracle = ContinuationProposer([prompt + expected], noise=0.3, seed=k)
    out = mlx_mtp.generate(pair, prompt, max_tokens=30, num_draft_tokens=k, logits_processors=penalties(),
                           proposer=oracle)
    assert out.tokens == expected and max(out.stats.accepted) >= min(k, 2)  # accepted runs: processed positions


def test_a_processor_that_returns_the_wrong_shape_is_an_error_not_a_wrong_answer():
    pair = load_pair("31b")
    prompt = prompt_of(2100, seed=8)  # past a prefill chunk
    cache = mlx_mtp.make_prompt_cache(pair)
    with pytest.raises(ValueError, match=r"must return logits of shape \[1, 512\], got \[1, 10\]"):
        mlx_mtp.generate(pair, prompt, max_tokens=5, prompt_cache=cache, logits_processors=[lambda t, x: x[:, :10]])
    with pytest.raises(ValueError, match="logits_processors must be callables"):
        mlx_mtp.generate(pair, prompt, max_tokens=5, logits_processors=[3])
    # The failed turn left nothing behind, and the next one is exact.
    assert cache.tokens == []
    expected = plain_greedy(pair.target.model, prompt, 6, logits_processors=penalties())
    assert mlx_mtp.generate(pair, prompt, max_tokens=6, prompt_cache=cache, logits_processors=penalties()).tokens == expected


def test_rows_with_and_without_processors_in_one_batch():
    pair = load_pair("e2b")
    prompts = [prompt_of(n, seed=20 + n) for n in (9, 15)]
    results = mlx_mtp.batch_generate(pair, prompts, max_tokens=20, num_draft_tokens=3, logits_processors=penalties())
    assert [r.tokens for r in results] == [plain_greedy(pair.target.model, p, 20, logits_processors=penalties())
                                           for p in prompts]


def processed_probabilities(model, prompt, sequences, params):
    """Exact probability of each continuation under the target with mlx-lm's processing:
    the processors see the ids before each position, then top-p/min-p/top-k/temperature."""
    out = []
    for s in sequences:
        logits = model(mx.array([prompt + list(s)]))[0, len(prompt) - 1 : -1]  # [T, V]
        total = 0.0
        for t, token in enumerate(s):
            x = logits[t][None]
            for processor in params.logits_processors:
                x = processor(mx.array(prompt + list(s[:t])), x)
            total += log_probs(x, params)[0, token].item()
        out.append(math.exp(total))
    return out


def p_value(samples, probabilities) -> float:
    """Chi-square p-value of the observed continuations against exact probabilities
    (a dict; continuations expected fewer than 5 times are pooled)."""
    counts, n = Counter(samples), len(samples)
    chi, cells, rest_obs, rest_exp = 0.0, 0, n, n
    for s, count in counts.items():
        e = probabilities[s] * n
        if e >= 5:
            chi += (count - e) ** 2 / e
            cells, rest_obs, rest_exp = cells + 1, rest_obs - count, rest_exp - e
    chi += (rest_obs - rest_exp) ** 2 / max(rest_exp, 1e-9)
    z = ((chi / cells) ** (1 / 3) - (1 - 2 / (9 * cells))) / math.sqrt(2 / (9 * cells))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("name", ["31b", "e2b"])
def test_sampling_with_logits_processors_follows_the_processed_target(name):
    pair = load_pair(name)
    prompt = prompt_of(12, seed=3)
    # The most likely first token banned, and a repetition penalty on the prompt's ids.
    likely = mx.argmax(pair.target.model(mx.array([prompt]))[0, -1]).item()
    processors = make_logits_processors(logit_bias={likely: -30.0}, repetition_penalty=1.6)
    params = SamplingParams(temperature=1.0, logits_processors=processors)
    results = mlx_mtp.batch_generate(pair, [prompt] * 600, max_tokens=2, temperature=1.0, seed=5, max_batch=64,
                                     num_draft_tokens=2, logits_processors=processors)
    samples = [tuple(r.tokens) for r in results]
    distinct = sorted(set(samples))
    processed = dict(zip(distinct, processed_probabilities(pair.target.model, prompt, distinct, params)))
    plain = dict(zip(distinct, processed_probabilities(pair.target.model, prompt, distinct, SamplingParams(1.0))))
    assert p_value(samples, processed) > 1e-3
    assert p_value(samples, plain) < 1e-6  # the processors were applied
