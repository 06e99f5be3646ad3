"""Parity with the reference (transformers 5.20.2), from scripts/make_fixtures.py outputs.

Same target state -> same hidden state, same drafter logits and the same first-round
proposals as `SinglePositionMultiTokenCandidateGenerator`, for sparse and dense heads,
with prompts shorter and longer than the sliding window.
"""

import mlx.core as mx
import numpy as np
import pytest

import mlx_mtp
from conftest import FIXTURES, load_pair
from mlx_mtp.decoding.proposers import DraftContext, MTPProposer
from mlx_mtp.decoding.sampling import SamplingParams

REFERENCE = np.load(FIXTURES / "reference.npz")
CASES = [(pair, prompt) for pair in ("e2b", "31b", "moe") for prompt in ("prompt_short", "prompt_long")]


def first_round(name, prompt_key, k=4):
    pair = load_pair(name)
    seq = mlx_mtp.make_prompt_cache(pair)
    prompt = REFERENCE[prompt_key].tolist()
    mlx_mtp.generate(pair, prompt, max_tokens=1, num_draft_tokens=0, prompt_cache=seq)  # reads the prompt
    ctx = DraftContext(
        mx.array(seq.tokens[-1:]), seq.carry, seq.cached, pair.target.shared_kv(seq.cache), [seq.tokens],
        [SamplingParams()],
    )
    return pair, seq, MTPProposer(pair.drafter, pair.target).propose(ctx, k)


@pytest.mark.parametrize("name, prompt", CASES)
def test_target_hidden_logits_and_greedy_match_reference(name, prompt):
    pair, seq, _ = first_round(name, prompt)
    ref = lambda key: REFERENCE[f"{key}_{name}_{prompt}"]
    np.testing.assert_allclose(np.array(seq.carry[0, 0]), ref("hidden"), atol=2e-4, rtol=1e-4)
    logits = pair.target.logits(seq.carry)[0, 0]
    np.testing.assert_allclose(np.array(logits), ref("last_logits"), atol=2e-4, rtol=1e-4)
    out = mlx_mtp.generate(pair, REFERENCE[prompt].tolist(), max_tokens=24, num_draft_tokens=4)
    assert out.tokens == ref("greedy").tolist()


@pytest.mark.parametrize("name, prompt", CASES)
def test_drafter_first_round_matches_reference(name, prompt):
    _, _, proposal = first_round(name, prompt)
    ref = lambda key: REFERENCE[f"{key}_{name}_{prompt}"]
    assert proposal.tokens[0].tolist() == ref("draft_ids").tolist()
    reference_logits = ref("draft_logits")  # [K, V]
    for step in range(reference_logits.shape[0]):
        logits = np.array(proposal.q_logprobs[0, step])  # greedy: the raw head logits
        if proposal.q_ids is None:  # dense head: the whole vocabulary
            np.testing.assert_allclose(logits, reference_logits[step], atol=2e-4, rtol=1e-4)
            continue
        ids = np.array(proposal.q_ids[0, step])
        assert sorted(ids.tolist()) == sorted(ref("draft_candidates")[step].tolist())
        np.testing.assert_allclose(logits, reference_logits[step][ids], atol=2e-4, rtol=1e-4)
        # The reference fills everything else with (min - 1): below every candidate.
        outside = np.setdiff1d(np.arange(reference_logits.shape[1]), ids)
        assert reference_logits[step][outside].max() < logits.min()


@pytest.mark.parametrize("name", ["e2b", "31b"])
def test_drafter_after_rollbacks_sees_only_committed_positions(name):
    """After many partly rejected rounds past the window, the drafter's view equals the
    view of a fresh prefill of the committed tokens (which matches the reference)."""
    from conftest import ContinuationProposer, plain_greedy

    pair = load_pair(name)
    prompt = REFERENCE["prompt_long"].tolist()
    expected = plain_greedy(pair.target.model, prompt, 60)
    drafter = MTPProposer(pair.drafter, pair.target)
    oracle = ContinuationProposer([prompt + expected], noise=0.4)
    live = mlx_mtp.make_prompt_cache(pair)
    out = mlx_mtp.generate(pair, prompt, max_tokens=60, num_draft_tokens=5, prompt_cache=live, proposer=oracle)
    assert 0 < out.stats.acceptance_rate < 1

    fresh = mlx_mtp.make_prompt_cache(pair)
    mlx_mtp.generate(pair, live.tokens[:-1], max_tokens=1, num_draft_tokens=0, prompt_cache=fresh, proposer=oracle)
    assert fresh.tokens == live.tokens
    proposals = []
    for seq in (live, fresh):
        ctx = DraftContext(
            mx.array(seq.tokens[-1:]), seq.carry, seq.cached, pair.target.shared_kv(seq.cache), [seq.tokens],
            [SamplingParams()],
        )
        proposals.append(drafter.propose(ctx, 4))
    assert proposals[0].tokens.tolist() == proposals[1].tokens.tolist()
    np.testing.assert_allclose(
        np.array(proposals[0].q_logprobs), np.array(proposals[1].q_logprobs), atol=2e-4, rtol=1e-4
    )
