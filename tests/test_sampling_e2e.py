"""Sampled continuations through the whole stack follow the target's own distribution.

Many rows of one prompt are sampled at once with `batch_generate` (rows are independent
samples), and single sequences with `generate`; the counts of each continuation are
compared with its exact probability under the target (chi-square, rare ones pooled).
"""

import math
from collections import Counter

import mlx.core as mx
import pytest

import mlx_mtp
from conftest import NoisyTargetProposer, load_pair, prompt_of
from mlx_mtp.decoding.sampling import SamplingParams, log_probs

PROMPT = prompt_of(11, seed=3)


def exact_probabilities(model, prompt, sequences, params):
    """Probability of each continuation under the plain target and the same processing
    (a continuation cut short by EOS has the probability of its own tokens)."""
    out = {}
    for length in {len(s) for s in sequences}:
        group = [s for s in sequences if len(s) == length]
        batch = mx.array([prompt + list(s) for s in group])
        logprobs = log_probs(model(batch)[:, len(prompt) - 1 : -1], params)  # [N, T, V]
        picked = mx.take_along_axis(logprobs, mx.array([list(s) for s in group])[..., None], axis=-1)
        out.update(zip(group, (math.exp(x) for x in picked[..., 0].sum(axis=1).tolist())))
    return [out[s] for s in sequences]


def goodness_of_fit(samples, model, params, prompt=PROMPT, probabilities=None) -> float:
    """Chi-square p-value of the observed continuations against the target's own
    (`probabilities`: distinct continuations -> their probabilities, if not the target's)."""
    counts = Counter(tuple(s) for s in samples)
    n = len(samples)
    distinct = sorted(counts)
    probabilities = probabilities or (lambda seqs: exact_probabilities(model, prompt, seqs, params))
    expected = dict(zip(distinct, probabilities(distinct)))
    chi, cells, pooled_obs, pooled_exp = 0.0, 0, n, n
    for s in distinct:
        e = expected[s] * n
        if e >= 5:
            chi += (counts[s] - e) ** 2 / e
            cells += 1
            pooled_obs -= counts[s]
            pooled_exp -= e
    chi += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
    df = max(cells, 1)
    z = ((chi / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_rows(pair, params, rows, **kwargs):
    results = mlx_mtp.batch_generate(
        pair, [PROMPT] * rows, temperature=params.temperature, top_p=params.top_p, seed=1, **kwargs
    )
    return results, [r.tokens for r in results]


@pytest.mark.parametrize(
    "name, params",
    [("31b", SamplingParams(temperature=1.0)), ("31b", SamplingParams(1.0, top_p=0.7)), ("e2b", SamplingParams(1.0))],
    ids=["dense-temp1", "dense-top_p", "sparse-temp1"],
)
def test_batched_sampling_rows_follow_target_distribution(name, params):
    pair = load_pair(name)
    # The pair's own drafter (far from p on this prompt: mostly residual resampling) ...
    results, samples = sample_rows(pair, params, 1000, max_tokens=3, num_draft_tokens=2)
    assert sum(r.stats.drafted_tokens for r in results) > 0
    assert goodness_of_fit(samples, pair.target.model, params) > 1e-3
    # ... and a q close to p (mostly accepted; rejections resample the residual).
    noisy = NoisyTargetProposer(pair.target.model, noise=1.0)
    results, samples = sample_rows(pair, params, 2000, max_tokens=3, num_draft_tokens=2, proposer=noisy)
    assert 0.3 < sum(r.stats.acceptance_rate for r in results) / len(results) < 0.95
    assert goodness_of_fit(samples, pair.target.model, params) > 1e-3


def test_single_sequence_sampling_follows_target_distribution():
    pair = load_pair("31b")
    params = SamplingParams(temperature=1.0)
    noisy = NoisyTargetProposer(pair.target.model, noise=1.0)
    samples = [
        mlx_mtp.generate(pair, PROMPT, max_tokens=3, num_draft_tokens=2, temperature=1.0, seed=s,
                         proposer=noisy).tokens
        for s in range(500)
    ]
    assert goodness_of_fit(samples, pair.target.model, params) > 1e-3


def test_same_seed_same_sample():
    pair = load_pair("e2b")
    runs = [mlx_mtp.generate(pair, PROMPT, max_tokens=12, temperature=0.8, top_k=20, seed=42).tokens for _ in range(2)]
    assert runs[0] == runs[1]
