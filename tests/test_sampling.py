"""Exactness of speculative sampling, by exhaustive counting on a tiny vocabulary.

A toy "target" and "drafter" are conditional tables over V tokens. Many rows run one
round at once through `accept_sampled`; each row is then completed to length K + 1 with
the target's own conditionals (what the next rounds would do). The joint distribution
of the K + 1 tokens must be the target's, whatever q is.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_mtp.decoding.proposers import overlay
from mlx_mtp.decoding.sampling import Proposal, SamplingParams, accept_greedy, accept_sampled, log_probs

V, K, ROWS = 5, 2, 200_000


def chi_square_p_value(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square test p-value (Wilson-Hilferty approximation)."""
    keep = expected > 0
    assert observed[~keep].sum() == 0, "an impossible sequence was produced"
    chi = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((chi / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def tables(seed: int, sharp: float):
    """Conditional log-prob tables: position 0 [V], 1 [V, V], 2 [V, V, V] (last axis: next)."""
    rng = np.random.default_rng(seed)
    return [mx.array(rng.normal(size=(V,) * (i + 1)) * sharp, mx.float32) for i in range(K + 1)]


def conditional(table_list, prefix, i):
    """Row-wise logits [R, V] of position i given prefix tokens [R, i]."""
    t = table_list[i]
    for j in range(i):
        t = t[prefix[:, j]] if j == 0 else mx.take_along_axis(t, prefix[:, j].reshape(-1, *([1] * (t.ndim - 1))), axis=1)[:, 0]
    return t if i else mx.broadcast_to(t, (prefix.shape[0], V))


def run_round(p_tables, q_tables, params, q_support=None, lookup=None):
    """Draft K from q, verify against p, complete each row to K + 1 tokens from p.

    lookup: "dense" or "sparse": every other row gets a deterministic n-gram-style
    proposal instead, merged into the drafter's proposal as the hybrid proposer does."""
    mx.random.seed(7)
    drafts, q_draft, q_lp = [], [], []
    prefix = mx.zeros((ROWS, 0), mx.int32)
    for i in range(K):
        logits = conditional(q_tables, prefix, i)
        if q_support is not None:  # a sparse head: q is 0 outside its candidate ids
            logits = mx.where(q_support, logits, -mx.inf)
        lp = log_probs(logits, params)
        tok = mx.random.categorical(lp)
        drafts.append(tok)
        q_draft.append(mx.exp(mx.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]))
        q_lp.append(lp)
        prefix = mx.concatenate([prefix, tok[:, None].astype(mx.int32)], axis=1)
    proposal = Proposal(prefix, mx.stack(q_draft, 1), mx.stack(q_lp, 1))
    if lookup:
        if lookup == "sparse":  # the same q, expressed over candidate ids
            proposal.q_ids = mx.broadcast_to(mx.arange(V), proposal.q_logprobs.shape)
        lookups = [[r % V, (r // 2) % V] if r % 2 else None for r in range(ROWS)]
        proposal = overlay(proposal, lookups, V)
        prefix = proposal.tokens
    p_lp = mx.stack([log_probs(conditional(p_tables, prefix, i), params) for i in range(K + 1)], axis=1)
    accepted, tokens = accept_sampled(p_lp, proposal)
    # Complete rows past their committed prefix with the target itself.
    out = tokens
    for i in range(1, K + 1):
        fresh = mx.random.categorical(log_probs(conditional(p_tables, out[:, :i], i), params))
        out = mx.where(mx.arange(K + 1)[None] == i, mx.where(accepted[:, None] >= i, out, fresh[:, None]), out)
    mx.eval(out, accepted)
    return np.array(out), np.array(accepted)


def expected_joint(p_tables, params):
    """Exact probability of every length-(K+1) sequence under p: [V] * (K + 1)."""
    probs = np.zeros((V,) * (K + 1))
    for seq in np.ndindex(*probs.shape):
        prefix = mx.array([seq], mx.int32)
        probs[seq] = math.prod(
            math.exp(log_probs(conditional(p_tables, prefix[:, :i], i), params)[0, seq[i]].item())
            for i in range(K + 1)
        )
    return probs


def counts(out):
    flat = np.ravel_multi_index(out.T, (V,) * (K + 1))
    return np.bincount(flat, minlength=V ** (K + 1)).reshape((V,) * (K + 1))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(1.0, top_k=3, min_p=0.05)],
    ids=["temp1", "top_p", "top_k_min_p"],
)
@pytest.mark.parametrize("q_kind", ["close", "far", "sparse"])
def test_speculative_sampling_matches_target_distribution(params, q_kind):
    p = tables(0, 1.5)
    if q_kind == "close":
        q = [t + 0.3 * n for t, n in zip(p, tables(1, 1.0))]
    else:
        q = tables(2, 1.5)
    support = None
    if q_kind == "sparse":
        support = mx.array(np.random.default_rng(3).random((ROWS, V)) < 0.6)
        support = mx.where(support.any(axis=1, keepdims=True), support, mx.ones_like(support))
    out, _ = run_round(p, q, params, support)
    expected = expected_joint(p, params) * ROWS
    assert chi_square_p_value(counts(out).ravel(), expected.ravel()) > 1e-3


@pytest.mark.parametrize("lookup", ["dense", "sparse"])
def test_rows_mixing_lookup_and_drafter_proposals_match_target_distribution(lookup):
    params = SamplingParams(temperature=1.0)
    p = tables(0, 1.5)
    q = [t + 0.3 * n for t, n in zip(p, tables(1, 1.0))]
    out, _ = run_round(p, q, params, lookup=lookup)
    expected = expected_joint(p, params) * ROWS
    assert chi_square_p_value(counts(out).ravel(), expected.ravel()) > 1e-3


def test_acceptance_beats_exact_match_when_q_is_close():
    params = SamplingParams(temperature=1.0)
    p = tables(0, 1.5)
    q = [t + 0.2 * n for t, n in zip(p, tables(1, 1.0))]
    _, accepted = run_round(p, q, params)
    first_accepted = (accepted >= 1).mean()
    # Exact-match acceptance of the first draft: P(d == token sampled from p) = sum p * q.
    p0 = np.exp(np.array(log_probs(p[0], params)))
    q0 = np.exp(np.array(log_probs(q[0], params)))
    exact_match = float((p0 * q0).sum())
    min_rule = float(np.minimum(p0, q0).sum())  # what min(1, p/q) achieves in expectation
    assert abs(first_accepted - min_rule) < 0.01
    assert first_accepted > exact_match + 0.2


def test_greedy_acceptance_is_longest_matching_prefix():
    logits = mx.full((3, 4, 6), -1.0)
    target = mx.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, 5, 5]])
    logits = mx.put_along_axis(logits, target[..., None], mx.array(1.0), axis=-1)
    drafts = mx.array([[1, 2, 3], [1, 0, 3], [0, 5, 5]])
    accepted, tokens = accept_greedy(logits, drafts)
    assert accepted.tolist() == [3, 1, 0]
    assert tokens.tolist() == target.tolist()
