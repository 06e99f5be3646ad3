"""Proposers: who guesses the next K tokens. Verification does not care who proposed.

A proposer gets a `DraftContext` (the newest committed token, the target's hidden state that
produced it, the target's KV views and the committed history) and returns a `Proposal`.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Protocol

import mlx.core as mx

from ..models.cache import MAX_DRAFT_TOKENS
from ..models.drafter import Drafter
from ..models.target import Target
from .sampling import Proposal, SamplingParams, group_rows, log_probs, process_logits, regroup, sample_candidates


@dataclass
class DraftContext:
    token: mx.array  # [B] newest committed token (not yet in the target's cache)
    carry: mx.array  # [B, 1, H] target's post-norm hidden state that produced `token`
    position: object  # position of `token`: int, or [B] for rows at different positions
    shared_kv: Optional[dict]  # kind -> (keys, values, first position), views of the target cache; set by the round
    history: list  # committed token ids per row (list of lists)
    params: list  # per row: SamplingParams
    states: Optional[list] = None  # per row: the proposer's state for it (`new_state()`)
    keys: Optional[mx.array] = None  # [B, 2]: per row, the key of its draws this round (None: all greedy)


class Proposer(Protocol):
    name: str

    def new_state(self):
        """What this proposer keeps for one row (n-gram index, live acceptance), or None."""

    def next_source(self, state, history: List[int]) -> str:
        """Who would propose after `history` (host-side: chosen before the round is built);
        "none" when nobody would."""

    def propose(self, ctx: DraftContext, k: int) -> Optional[Proposal]:
        """K tokens per row, or None when this proposer has nothing to offer. Rows with
        nothing to offer are named "none" in `sources` (their drafts are not verified)."""

    def observe(self, states: list, sources: List[str], accepted: List[int], committed: List[List[int]]):
        """Learn, per row, how many drafts were accepted and which ids were committed."""


class StatelessProposer:
    """A proposer that keeps nothing per row."""

    def new_state(self):
        return None

    def next_source(self, state, history: List[int]) -> str:
        return self.name

    def observe(self, states, sources, accepted, committed):
        pass


def deterministic(tokens: mx.array) -> Proposal:
    """A proposal with q = 1 on each proposed token: [B, K] ids."""
    ones = mx.ones(tokens.shape, mx.float32)
    return Proposal(tokens, ones, mx.zeros((*tokens.shape, 1)), tokens[..., None])


class MTPProposer(StatelessProposer):
    """K autoregressive drafter steps from a constant position (no target work)."""

    name = "mtp"

    def __init__(self, drafter: Drafter, target: Target):
        self.drafter = drafter
        self.target = target
        self.vocab_size = drafter.vocab_size

    def propose(self, ctx: DraftContext, k: int) -> Proposal:
        kv = {kind: (keys, values) for kind, (keys, values, _) in ctx.shared_kv.items()}
        masks = self.drafter.masks(ctx.shared_kv, ctx.position)
        groups = group_rows(ctx.params)
        step_keys = None  # [B, MAX_DRAFT_TOKENS, 2]: row i's step-j draw comes from its own key
        if ctx.keys is not None:
            step_keys = mx.vmap(lambda key: mx.random.split(key, MAX_DRAFT_TOKENS))(ctx.keys)
        token, carry = ctx.token, ctx.carry
        tokens, q_draft, q_logprobs, q_ids = [], [], [], []
        for step in range(k):
            embedding = self.target.embed(token[:, None])
            candidates, carry = self.drafter(embedding, carry, kv, masks, ctx.position)
            logits = candidates.logits
            if any(p.logits_processors for p in ctx.params):  # as the target's p will be
                drafted = mx.stack(tokens, axis=1) if tokens else mx.zeros((len(ctx.params), 0), mx.int32)
                logits = process_logits(logits[:, None], ctx.params, ctx.history, drafted, step,
                                        candidates.ids, self.drafter.vocab_size)[:, 0]
            if len(groups) == 1 and groups[0][0].greedy:
                logprobs = logits  # argmax needs no normalization
                token, q = sample_candidates(logprobs, candidates.ids, True)
            else:  # each row by its own settings, from its own key
                parts = [self._sample(logits, candidates.ids, mx.array(rows), p, step_keys, step) for p, rows in groups]
                token, q, logprobs = (regroup(list(x), groups) for x in zip(*parts))
            tokens.append(token)
            q_draft.append(q)
            q_logprobs.append(logprobs)
            q_ids.append(candidates.ids)
        ids = None if q_ids[0] is None else mx.stack(q_ids, axis=1)
        return Proposal(
            mx.stack(tokens, axis=1), mx.stack(q_draft, axis=1), mx.stack(q_logprobs, axis=1), ids
        )

    @staticmethod
    def _sample(logits: mx.array, ids: Optional[mx.array], index: mx.array, params: SamplingParams, step_keys,
                step: int):
        """Drafts of the rows `index` (equal settings) from logits [B, C] over ids [B, C]
        (None: the vocabulary): (tokens [G], q of them [G], q [G, C])."""
        ids = None if ids is None else ids[index]
        if params.greedy:  # the round verifies greedy rows by argmax: q is never read
            logprobs = logits[index].astype(mx.float32)
            token, q = sample_candidates(logprobs, ids, True)
        else:
            logprobs = log_probs(logits[index], params)
            token, q = sample_candidates(logprobs, ids, False, None if step_keys is None else step_keys[index, step])
        return token, q, logprobs


class DraftsFromRankZero(StatelessProposer):
    """The drafter on the pipeline ranks that do not hold it: rank 0 drafts, and the round
    shares its ids with every rank (pipeline.py); this gives a proposal of their shape."""

    name = "mtp"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def propose(self, ctx: DraftContext, k: int) -> Proposal:
        return deterministic(mx.zeros((len(ctx.params), k), mx.int32))


class NGramIndex:
    """The latest earlier start of every 2..4-gram of one growing token history, kept up to
    date as tokens are committed: a lookup costs a few dict probes, not a scan of the history."""

    def __init__(self, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n
        self.tokens: List[int] = []  # the history indexed so far
        self.latest = {}  # n-gram tuple -> start of its latest occurrence followed by a token

    def sync(self, history: List[int]):
        if history[: len(self.tokens)] != self.tokens:  # another sequence: index it afresh
            self.tokens, self.latest = [], {}
        for length in range(len(self.tokens) + 1, len(history) + 1):
            # Reaching `length`, the n-grams ending at length - 2 get a following token.
            for n in range(self.min_n, self.max_n + 1):
                start = length - n - 1
                if start >= 0:
                    self.latest[tuple(history[start : start + n])] = start
        self.tokens += history[len(self.tokens) :]

    def lookup(self, history: List[int], k: int) -> Optional[List[int]]:
        """The k tokens that followed the latest earlier occurrence of the longest suffix
        (max_n down to min_n tokens) of `history`, or None when no suffix recurs."""
        self.sync(history)
        for n in range(min(self.max_n, len(history) - 1), self.min_n - 1, -1):
            start = self.latest.get(tuple(history[-n:]))
            if start is not None:
                follow = history[start + n : start + n + k]
                return follow + follow[-1:] * (k - len(follow))
        return None


class NGramProposer:
    """Copies what followed the same few tokens earlier in the prompt or the output."""

    name = "ngram"

    def new_state(self) -> NGramIndex:
        return NGramIndex()

    def next_source(self, state: NGramIndex, history: List[int]) -> str:
        return self.name if state.lookup(history, 1) is not None else "none"

    def propose(self, ctx: DraftContext, k: int) -> Optional[Proposal]:
        rows = [index.lookup(h, k) for index, h in zip(ctx.states, ctx.history)]
        if all(r is None for r in rows):
            return None
        proposal = deterministic(mx.array([r or [0] * k for r in rows]))
        proposal.sources = [self.name if r is not None else "none" for r in rows]
        return proposal

    def observe(self, states, sources, accepted, committed):
        pass


@dataclass
class HybridState:
    """One row's n-gram index and live first-draft acceptance per source."""

    index: NGramIndex = field(default_factory=NGramIndex)
    # A one-round prior of 0.5 acceptance each: every row starts from the same prior.
    rounds: dict = field(default_factory=lambda: {"mtp": 1, "ngram": 1})
    hits: dict = field(default_factory=lambda: {"mtp": 0.5, "ngram": 0.5})
    lookup: Optional[List[int]] = None  # the last proposal's lookup, used or not

    def acceptance(self, source: str) -> float:
        """Share of its rounds whose first draft was accepted."""
        return self.hits[source] / self.rounds[source]

    def use_lookup(self) -> bool:
        return self.acceptance("ngram") >= self.acceptance("mtp")


class HybridProposer:
    """Per row: the n-gram lookup where it matches and its live first-draft acceptance is at
    least the drafter's, the MTP drafter elsewhere."""

    name = "hybrid"

    def __init__(self, mtp: MTPProposer):
        self.mtp = mtp

    def new_state(self) -> HybridState:
        return HybridState()

    def next_source(self, state: HybridState, history: List[int]) -> str:
        if state.use_lookup() and state.index.lookup(history, 1) is not None:
            return "ngram"
        return "mtp"

    def propose(self, ctx: DraftContext, k: int) -> Proposal:
        lookups = []
        for state, history in zip(ctx.states, ctx.history):
            state.lookup = state.index.lookup(history, k)
            lookups.append(state.lookup if state.use_lookup() else None)
        if all(r is not None for r in lookups):
            proposal = deterministic(mx.array(lookups))
        else:
            proposal = self.mtp.propose(ctx, k)
            if any(r is not None for r in lookups):
                proposal = overlay(proposal, lookups, self.mtp.vocab_size)
        proposal.sources = ["ngram" if r is not None else "mtp" for r in lookups]
        return proposal

    def observe(self, states, sources: List[str], accepted: List[int], committed: List[List[int]]):
        """Count each row's first draft. A lookup that went unused is scored too, against the
        token the target committed: that token is distributed as the target's p, so a match
        happens with the probability the lookup's first draft would have been accepted. A
        source switched off thus keeps being measured and can win back its rounds."""
        for state, source, n, tokens in zip(states, sources, accepted, committed):
            lookup, state.lookup = state.lookup, None
            if source in state.rounds:
                state.rounds[source] += 1
                state.hits[source] += n > 0
            if source != "ngram" and lookup is not None:
                state.rounds["ngram"] += 1
                state.hits["ngram"] += lookup[0] == tokens[0]


def overlay(proposal: Proposal, lookups, vocab_size: int) -> Proposal:
    """Replace the rows that have an n-gram proposal by it, with q = 1 on its tokens."""
    use = mx.array([r is not None for r in lookups])[:, None]  # [B, 1]
    ngram = mx.array([r if r is not None else [0] * proposal.k for r in lookups])  # [B, K]
    tokens = mx.where(use, ngram, proposal.tokens)
    q_draft = mx.where(use, 1.0, proposal.q_draft)
    if proposal.q_ids is None:  # dense q over the vocabulary: one-hot on the token
        vocab = mx.arange(proposal.q_logprobs.shape[-1])
        onehot = mx.where(vocab == ngram[..., None], 0.0, -mx.inf)
        return Proposal(tokens, q_draft, mx.where(use[..., None], onehot, proposal.q_logprobs))
    # Sparse q: the token first, then distinct other ids with q = 0.
    C = proposal.q_ids.shape[-1]
    ids = (ngram[..., None] + mx.arange(C)) % vocab_size  # [B, K, C]
    logprobs = mx.where(mx.arange(C) == 0, 0.0, -mx.inf)
    return Proposal(
        tokens,
        q_draft,
        mx.where(use[..., None], logprobs, proposal.q_logprobs),
        mx.where(use[..., None], ids, proposal.q_ids),
    )


PROPOSERS = ("hybrid", "mtp", "ngram")


def make_proposer(name: str, target: Target, drafter: Optional[Drafter], drafter_on_rank_0: bool = False):
    """Who drafts: "hybrid" (the n-gram lookup where the context repeats itself, the
    drafter elsewhere; the lookup alone without a drafter), "mtp" (the drafter alone) or
    "ngram" (the lookup alone). A pipeline rank without the drafter takes rank 0's drafts."""
    if name not in PROPOSERS:
        raise ValueError(f"unknown proposer {name!r} (known: {', '.join(PROPOSERS)})")
    mtp = None
    if drafter is not None:
        mtp = MTPProposer(drafter, target)
    elif drafter_on_rank_0:
        mtp = DraftsFromRankZero(target.vocab_size)
    if name == "mtp" and mtp is None:
        raise ValueError("the proposer 'mtp' needs a drafter, and this pair has none")
    if name == "hybrid" and mtp is not None:
        return HybridProposer(mtp)
    return mtp if name == "mtp" else NGramProposer()
