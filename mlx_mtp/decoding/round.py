"""The speculative round: draft K, verify K + 1 in one target forward, accept, roll back.

A round runs for rows that share one batch cache (`cache.BatchCache`, one row or many).
Each row's cache holds every committed token but its newest, which waits (with the hidden
state that produced it) to be fed at the start of the next forward. Each row drafts up to
its own count and commits its own accepted prefix; rejected drafts are trimmed before
anything else reads the cache. One host sync per round: the accept decision.

A round commits or changes nothing: if anything raises before the decision is taken, every
row's cache position is put back where the round found it.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx

from .grammar import allowed_ids
from .proposers import DraftContext, Proposer, deterministic, overlay
from .sampling import Proposal, accept, token_logprobs
from ..models.cache import MAX_DRAFT_TOKENS
from ..models.target import Target


@dataclass
class RoundResult:
    committed: List[int]  # ids committed this round, in order
    drafted: List[int]  # the row's proposed ids, none past a stop id that ended the row
    accepted: int  # how many of `drafted` were accepted and committed
    source: str  # who proposed ("mtp", "ngram", or "none")
    carry: mx.array  # [1, 1, H] hidden state that produced committed[-1]
    interrupted: bool = False  # the row ends after this round (asked before it was built)
    # per committed id, if the row asked: (its log-prob, [(id, log-prob)] of the top ones)
    logprobs: Optional[list] = None


def commit_length(tokens: list, limit: int, stop_ids) -> int:
    """How many of `tokens` to commit: at most `limit`, through the first stop id."""
    for i, t in enumerate(tokens[:limit]):
        if t in stop_ids:
            return i + 1
    return min(len(tokens), limit)


def run_round(target: Target, proposer: Optional[Proposer], rows: list, cache: list, counts: List[int],
              limits: List[int], interrupt: bool = False) -> List[RoundResult]:
    """One round for `rows` (in the cache's row order): row i drafts up to counts[i] tokens
    and commits between 1 and min(counts[i] + 1, limits[i]) of them. Each row has `tokens`,
    `carry`, `params`, `state` (its proposer state), `stop_ids` and `round_keys()` ([3, 2] or
    None for a greedy row). `interrupt`: the rows end after this round (in a pipeline, rank
    0's wish is the one every rank follows)."""
    saved = [list(c.positions) for c in cache]
    try:
        keys = round_keys(rows)  # [B, 3, 2]: per row, keys of its drafts, accept draws, last token
        position = rows[0].position if len(rows) == 1 else mx.array([r.position for r in rows])
        ctx = DraftContext(
            mx.array([r.tokens[-1] for r in rows]),
            mx.concatenate([r.carry for r in rows]),
            position,
            None,
            [r.tokens for r in rows],
            [r.params for r in rows],
            [r.state for r in rows],
            None if keys is None else keys[:, 0],
        )
        wanted = [r.request.logprobs for r in rows]
        top = max((n for n in wanted if n is not None), default=None)
        constraints = [getattr(r, "constraint", None) for r in rows]
        # forced ids: as many as the cache takes, or a row's fixed K (K = 0: plain decoding)
        fixed = [getattr(r, "draft_tokens", None) for r in rows]
        caps = [min(MAX_DRAFT_TOKENS if k is None else k, limit - 1) for k, limit in zip(fixed, limits)]
        proposal, hidden, accepted, out, interrupt, scores = draft_and_verify(
            target, proposer, ctx, cache, counts, None if keys is None else keys[:, 1:], interrupt, top,
            constraints if any(c is not None for c in constraints) else None, caps
        )
    except BaseException:
        for c, positions in zip(cache, saved):
            c.positions = positions
        raise

    k = proposal.k
    drafts = proposal.tokens.tolist()
    results, cuts = [], []
    for i, row in enumerate(rows):
        n = accepted[i]
        cut = commit_length(out[i][: n + 1], limits[i], row.stop_ids)
        source = proposal.sources[i]
        if cut <= n:  # a stop id among the accepted drafts: those past it never count
            drafted, n = drafts[i][:cut], cut
        else:
            drafted = drafts[i][: proposal.counts[i]]
        logprobs = None if wanted[i] is None else scored(scores, i, cut, wanted[i])
        results.append(RoundResult(out[i][:cut], drafted, n, source, hidden[i : i + 1, cut - 1 : cut], interrupt,
                                   logprobs))
        cuts.append(cut)
    for c in cache:
        c.trim_rows([k + 1 - cut for cut in cuts])
    if k > 0 and proposer is not None:
        proposer.observe(ctx.states, proposal.sources, [r.accepted for r in results], [r.committed for r in results])
    return results


def as_lists(scores):
    """`token_logprobs` arrays (evaluated) as lists; None stays None."""
    return None if scores is None else tuple(None if s is None else s.tolist() for s in scores)


def scored(scores, row: int, n: int, top: int) -> list:
    """Row `row`'s first n positions of `token_logprobs` lists: (log-prob, [(id, log-prob)]
    of its `top` most likely)."""
    chosen, ids, values = scores
    return [(chosen[row][t], [] if ids is None else list(zip(ids[row][t][:top], values[row][t][:top])))
            for t in range(n)]


def round_keys(rows: list) -> Optional[mx.array]:
    """[B, 3, 2]: each row's keys for this round (zeros for greedy rows), or None if all
    rows are greedy."""
    keys = [row.round_keys() for row in rows]
    if all(k is None for k in keys):
        return None
    greedy = mx.zeros((3, 2), mx.uint32)
    return mx.stack([greedy if k is None else k for k in keys])


def draft_and_verify(target: Target, proposer, ctx: DraftContext, cache, counts: List[int],
                     accept_keys: Optional[mx.array], interrupt: bool = False, logprobs: Optional[int] = None,
                     constraints: Optional[list] = None, caps: Optional[List[int]] = None):
    """Propose up to max(counts) tokens per row and verify [token, drafts] in one target
    forward. Returns the proposal (with per-row `counts` and `sources`), hidden [B, K + 1, H],
    and, evaluated in the round's one host sync, the accepted counts and the target's tokens
    [B, K + 1] as lists, `interrupt` (rank 0's, in a pipeline), and with `logprobs` (top
    alternatives) the `token_logprobs` of those tokens as lists (else None).

    constraints: per row a grammar `Constraint` or None (None: no row has one). A row's
    forced ids are its drafts (up to caps[i]), drafts its grammar forbids are cut, and its
    target distribution is masked at every verified position (drafts meet the host first)."""
    B = len(counts)
    forced = [c.forced()[:cap] if c is not None and cap > 0 else []
              for c, cap in zip(constraints or [None] * B, caps or [0] * B)]
    counts = [len(f) or n for f, n in zip(forced, counts)]
    k = max(counts)
    proposal = None
    if proposer is not None and any(n and not f for f, n in zip(forced, counts)):
        ctx.shared_kv = target.shared_kv(cache)
        proposal = proposer.propose(ctx, k)
    if proposal is None:
        proposal = Proposal(mx.zeros((B, 0), mx.int32))
        counts = [len(f) for f in forced]
        sources = ["none"] * B
    else:
        sources = proposal.sources or [proposer.name] * B
    if any(forced):  # the grammar's ids, with q = 1, in place of the proposer's
        padded = [f + f[-1:] * (k - len(f)) if f else None for f in forced]
        proposal = overlay(proposal, padded, target.vocab_size) if proposal.k else deterministic(
            mx.array([p or [0] * k for p in padded]))
        sources = ["grammar" if f else s for f, s in zip(forced, sources)]
    if proposal.k:  # rows the proposer had nothing for draft nothing
        counts = [0 if s == "none" else n for s, n in zip(sources, counts)]
    mask = None
    if constraints is not None:
        drafts = proposal.tokens.tolist() if proposal.k else [[] for _ in counts]
        counts = [n if c is None or f else c.allowed(d[:n]) for c, f, d, n in zip(constraints, forced, drafts, counts)]
        mask = allowed_ids(constraints, [d[:n] for d, n in zip(drafts, counts)], proposal.k + 1, target.vocab_size)
    proposal.counts = counts
    proposal.sources = [s if n else "none" for s, n in zip(sources, counts)]

    pipeline = target.pipeline
    if pipeline is not None and proposal.k:  # rank 0's drafts, scheduled before the forward
        proposal.tokens = pipeline.share(proposal.tokens.astype(mx.int32))
        mx.async_eval(proposal.tokens)
    hidden = target.hidden(mx.concatenate([ctx.token[:, None], proposal.tokens], axis=1), cache)
    logits = target.logits(hidden)  # [B, K + 1, V]
    accepted, out = accept(logits, proposal, counts, ctx.params, accept_keys, ctx.history, mask)
    if pipeline is not None:  # rank 0's decision, so that every rank commits and trims alike
        verdict = mx.concatenate([accepted[:, None], out, mx.full((B, 1), interrupt)], axis=1).astype(mx.int32)
        verdict = pipeline.share(verdict, after=hidden)
        # [B, 1 + (K + 1) + 1] -> [B], [B, K + 1], and the interrupt
        accepted, out, interrupt = verdict[:, 0], verdict[:, 1:-1], verdict[0, -1]
    scores = None if logprobs is None else token_logprobs(logits, out, logprobs)
    mx.eval(accepted, out, interrupt, proposal.tokens, scores)
    return proposal, hidden, accepted.tolist(), out.tolist(), bool(interrupt), as_lists(scores)
