"""Proposers: who guesses the next K tokens. Verification does not care who proposed.

A proposer gets a `DraftContext` (the newest committed token, the target's hidden state that
produced it, the target's KV views and the committed history) and returns a `Proposal`.
"""

from dataclasses import dataclass
from typing import Optional, Protocol

import mlx.core as mx

from .drafter import Drafter
from .sampling import Proposal, SamplingParams, log_probs, sample_candidates
from .target import Target


@dataclass
class DraftContext:
    token: mx.array  # [B] newest committed token (not yet in the target's cache)
    carry: mx.array  # [B, 1, H] target's post-norm hidden state that produced `token`
    position: object  # position of `token`: int, or [B] for rows at different positions
    shared_kv: dict  # kind -> (keys, values, first position), views of the target cache
    history: list  # committed token ids per row (list of lists)


class Proposer(Protocol):
    name: str

    def propose(self, ctx: DraftContext, k: int, params: SamplingParams) -> Optional[Proposal]:
        """K tokens per row, or None when this proposer has nothing to offer."""


def deterministic(tokens: mx.array) -> Proposal:
    """A proposal with q = 1 on each proposed token: [B, K] ids."""
    ones = mx.ones(tokens.shape, mx.float32)
    return Proposal(tokens, ones, mx.zeros((*tokens.shape, 1)), tokens[..., None])


class MTPProposer:
    """K autoregressive drafter steps from a constant position (no target work)."""

    name = "mtp"

    def __init__(self, drafter: Drafter, target: Target):
        self.drafter = drafter
        self.target = target

    def propose(self, ctx: DraftContext, k: int, params: SamplingParams) -> Proposal:
        kv = {kind: (keys, values) for kind, (keys, values, _) in ctx.shared_kv.items()}
        masks = self.drafter.masks(ctx.shared_kv, ctx.position)
        token, carry = ctx.token, ctx.carry
        tokens, q_draft, q_logprobs, q_ids = [], [], [], []
        for _ in range(k):
            embedding = self.target.embed(token[:, None])
            candidates, carry = self.drafter(embedding, carry, kv, masks, ctx.position)
            if params.greedy:
                logprobs = candidates.logits  # argmax needs no normalization
            else:
                logprobs = log_probs(candidates.logits, params)
            token, q = sample_candidates(logprobs, candidates.ids, params.greedy)
            tokens.append(token)
            q_draft.append(q)
            q_logprobs.append(logprobs)
            q_ids.append(candidates.ids)
        ids = None if q_ids[0] is None else mx.stack(q_ids, axis=1)
        return Proposal(
            mx.stack(tokens, axis=1), mx.stack(q_draft, axis=1), mx.stack(q_logprobs, axis=1), ids
        )
