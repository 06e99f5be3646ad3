"""The speculative round: draft K, verify K + 1 in one target forward, accept, roll back.

A `Sequence` is the decoding state of one conversation: the target's cache holds every
committed token but the newest, which waits (with the hidden state that produced it) to be
fed at the start of the next forward. Rejected drafts are trimmed from the cache before
anything else reads it. One host sync per round: the accept decision.
"""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from .cache import trim
from .proposers import DraftContext, Proposer
from .sampling import Proposal, SamplingParams, accept_greedy, accept_sampled, log_probs
from .target import Target

PREFILL_STEP = 2048


@dataclass
class Sequence:
    cache: list
    tokens: list = field(default_factory=list)  # committed ids; tokens[-1] has no KV yet
    carry: Optional[mx.array] = None  # [1, 1, H] hidden state that produced tokens[-1]

    @property
    def cached(self) -> int:
        """Number of positions in the target cache."""
        return max(len(self.tokens) - 1, 0)


@dataclass
class RoundResult:
    committed: list  # ids committed this round, in order
    drafted: list  # ids proposed this round
    accepted: int  # how many proposed ids the target accepted
    source: str  # who proposed ("mtp", "ngram", or "none")


def commit_length(tokens: list, limit: int, stop_ids) -> int:
    """How many of `tokens` to commit: at most `limit`, through the first stop id."""
    for i, t in enumerate(tokens[:limit]):
        if t in stop_ids:
            return i + 1
    return min(len(tokens), limit)


def pick_token(logits: mx.array, params: SamplingParams) -> mx.array:
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(log_probs(logits, params))


def prefill(target: Target, seq: Sequence, prompt: list, params: SamplingParams) -> int:
    """Read the prompt (after the pending token of an earlier turn) and commit one token."""
    tokens = seq.tokens[-1:] + list(prompt) if seq.tokens else list(prompt)
    inputs = mx.array(tokens)[None]
    while inputs.shape[1] > PREFILL_STEP:
        target.hidden(inputs[:, :PREFILL_STEP], seq.cache)
        mx.eval([c.state for c in seq.cache])
        inputs = inputs[:, PREFILL_STEP:]
    hidden = target.hidden(inputs, seq.cache)[:, -1:]
    token = pick_token(target.logits(hidden)[:, 0], params)
    mx.eval(token, hidden)
    seq.tokens += list(prompt) + [token.item()]
    seq.carry = hidden
    return seq.tokens[-1]


def run_round(
    target: Target,
    proposer: Optional[Proposer],
    seq: Sequence,
    k: int,
    params: SamplingParams,
    limit: int,
    stop_ids=(),
) -> RoundResult:
    """One round committing between 1 and min(k + 1, limit) tokens."""
    ctx = DraftContext(mx.array(seq.tokens[-1:]), seq.carry, seq.cached, None, [seq.tokens])
    proposal, hidden, accepted, out = draft_and_verify(target, proposer, ctx, seq.cache, k, params)
    k = proposal.k

    n = accepted.item()
    committed = out[0, : n + 1].tolist()
    cut = commit_length(committed, limit, stop_ids)
    trim(seq.cache, k + 1 - cut)
    seq.carry = hidden[:, cut - 1 : cut]
    seq.tokens += committed[:cut]
    sources = report(proposer, proposal, [n], [committed])
    return RoundResult(committed[:cut], proposal.tokens[0].tolist(), n, sources[0])


def draft_and_verify(target: Target, proposer, ctx: DraftContext, cache, k: int, params: SamplingParams):
    """Propose up to k tokens per row (ctx.token [B]) and verify [token, drafts] in one
    target forward. Returns the proposal, hidden [B, K + 1, H], the accepted count [B] and
    the target's tokens [B, K + 1], evaluated: the round's one host sync."""
    proposal = None
    if k > 0 and proposer is not None:
        ctx.shared_kv = target.shared_kv(cache)
        proposal = proposer.propose(ctx, k, params)
    if proposal is None:
        proposal = Proposal(mx.zeros((ctx.token.shape[0], 0), mx.int32))
    hidden = target.hidden(mx.concatenate([ctx.token[:, None], proposal.tokens], axis=1), cache)
    logits = target.logits(hidden)  # [B, K + 1, V]
    if params.greedy:
        accepted, out = accept_greedy(logits, proposal.tokens)
    else:
        accepted, out = accept_sampled(log_probs(logits, params), proposal)
    mx.eval(accepted, out, proposal.tokens)
    return proposal, hidden, accepted, out


def report(proposer, proposal: Proposal, accepted: list, committed: list) -> list:
    """Per-row sources of a round's proposal; tells the proposer what was accepted and
    committed (per row: accepted count, committed ids)."""
    if proposal.k == 0:
        return ["none"] * len(accepted)
    sources = proposal.sources or [proposer.name] * len(accepted)
    if hasattr(proposer, "observe"):
        proposer.observe(sources, accepted, committed)
    return sources
