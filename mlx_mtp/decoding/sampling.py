"""Sampling settings, the one processing applied to both p (target) and q (drafter), and the
exact acceptance rules (greedy, and speculative sampling after Leviathan et al. 2022).

All functions are lazy MLX graphs over rows [B]; the round evaluates them once.
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingParams:
    """mlx-lm's `make_sampler` settings, with its "off" values (top_p 0 or 1, top_k 0,
    min_p 0), and its logits processors: `processor(tokens, logits) -> logits`, tokens [N]
    the ids before the predicted position, logits [1, V] (e.g. from mlx-lm's
    `make_logits_processors`: logit bias, repetition penalty). They are applied, in order,
    to the target's p and to the drafter's q alike, before the settings above."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    logits_processors: Tuple[Callable, ...] = ()

    def __post_init__(self):
        processors = tuple(self.logits_processors or ())
        if not all(callable(f) for f in processors):
            raise ValueError("logits_processors must be callables (tokens, logits) -> logits")
        object.__setattr__(self, "logits_processors", processors)
        for name in ("temperature", "top_p", "top_k", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (0 or 1: off), got {self.top_p}")
        if self.top_p == 0:  # off, as in mlx-lm; one spelling, so equal settings share a graph
            object.__setattr__(self, "top_p", 1.0)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: mx.array, params: Sequence[SamplingParams], histories: List[List[int]],
                   drafts: mx.array, first: int = 0, ids: Optional[mx.array] = None, vocab_size: int = 0) -> mx.array:
    """Each row's logits processors applied to logits [B, T, C]: position t of row b
    predicts the token after histories[b] + drafts[b, : first + t] (what mlx-lm's
    `generate_step` passes as `tokens`). ids [B, C]: the candidate ids of a sparse head,
    whose logits are placed in a [1, vocab_size] row (-inf elsewhere) for the processors.
    Rows without processors are returned as they are."""
    if not any(p.logits_processors for p in params):
        return logits
    rows = []
    for b, p in enumerate(params):
        if not p.logits_processors:
            rows.append(logits[b])
            continue
        history = mx.array(histories[b], mx.int32)
        positions = []
        for t in range(logits.shape[1]):
            tokens = mx.concatenate([history, drafts[b, : first + t].astype(mx.int32)])
            x = logits[b, t][None]  # [1, C]
            if ids is not None:
                x = mx.put_along_axis(mx.full((1, vocab_size), -mx.inf, x.dtype), ids[b][None], x, axis=-1)
            for processor in p.logits_processors:
                shape = x.shape
                x = processor(tokens, x)
                if not isinstance(x, mx.array) or x.shape != shape:  # shapes are known before evaluation
                    raise ValueError(f"a logits processor must return logits of shape {list(shape)}, "
                                     f"got {list(x.shape) if isinstance(x, mx.array) else type(x).__name__}")
            if ids is not None:
                x = mx.take_along_axis(x, ids[b][None], axis=-1)
            positions.append(x[0])
        rows.append(mx.stack(positions))
    return mx.stack(rows)


def log_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """The processed, normalized distribution: [..., C] logits -> [..., C] log-probs.

    Same order as mlx-lm's `make_sampler`: top-p, min-p, top-k on the untempered
    log-probs, then the temperature.
    """
    logits = logits.astype(mx.float32)
    x = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        x = apply_top_p(x, params.top_p)
    if params.min_p > 0.0:
        x = apply_min_p(x, params.min_p)
    if 0 < params.top_k < x.shape[-1]:
        x = apply_top_k(x, params.top_k)
    x = x / params.temperature
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


@dataclass
class Proposal:
    """K proposed tokens per row and the proposer's probabilities for them.

    `q_logprobs` [B, K, C] is q over the candidate ids `q_ids` [B, K, C] (None: the whole
    vocabulary); `q_draft` [B, K] is q of each proposed token. A deterministic proposer
    (n-gram lookup, greedy drafting) has q = 1 on its token.
    """

    tokens: mx.array  # [B, K]
    q_draft: Optional[mx.array] = None
    q_logprobs: Optional[mx.array] = None
    q_ids: Optional[mx.array] = None
    sources: Optional[List[str]] = None  # per row, who proposed (a hybrid mixes them)
    counts: Optional[List[int]] = None  # per row, how many drafts are verified (set by the round)

    @property
    def k(self) -> int:
        return self.tokens.shape[1]

    def rows(self, index: mx.array, k: int) -> "Proposal":
        """These rows' first k proposals, as a proposal of their own."""
        pick = lambda a: None if a is None else a[index, :k]
        return Proposal(self.tokens[index, :k], pick(self.q_draft), pick(self.q_logprobs), pick(self.q_ids))


def accept_greedy(target_logits: mx.array, drafts: mx.array, counts: Optional[mx.array] = None):
    """[B, K+1, V], [B, K] -> accepted count [B], and the target's own tokens [B, K+1].
    counts [B]: row i considers only its first counts[i] drafts (None: all K)."""
    target = mx.argmax(target_logits, axis=-1)
    k = drafts.shape[1]
    matches = drafts == target[:, :k]
    if counts is not None:
        matches = matches & (mx.arange(k)[None] < counts[:, None])
    accepted = mx.cumprod(matches.astype(mx.int32), axis=1).sum(axis=1)
    return accepted, target


def _residual(p: mx.array, q_probs: mx.array, q_ids: Optional[mx.array]) -> mx.array:
    """normalize(max(0, p - q)) for p [B, V] and q [B, C] over ids [B, C]."""
    if q_ids is None:
        r = mx.maximum(p - q_probs, 0)
    else:
        p_at = mx.take_along_axis(p, q_ids, axis=-1)
        r = mx.put_along_axis(p, q_ids, mx.maximum(p_at - q_probs, 0), axis=-1)
    total = r.sum(axis=-1, keepdims=True)
    # p == q up to rounding: the rejection had probability ~0, fall back to p.
    return mx.where(total > 0, r / mx.maximum(total, 1e-30), p)


def uniform(rows: int, shape: tuple, keys: Optional[mx.array]) -> mx.array:
    """[rows, *shape] uniform draws, row i from keys[i] (None: the global stream)."""
    if keys is None:
        return mx.random.uniform(shape=(rows, *shape))
    return mx.vmap(lambda key: mx.random.uniform(shape=shape, key=key))(keys)


def categorical(logprobs: mx.array, keys: Optional[mx.array]) -> mx.array:
    """One id per row of [B, C] log-probs, row i drawn from keys[i] (None: the global stream)."""
    if keys is None:
        return mx.random.categorical(logprobs)
    return mx.vmap(lambda x, key: mx.random.categorical(x, key=key))(logprobs, keys)


def accept_sampled(target_logprobs: mx.array, proposal: Proposal, keys: Optional[mx.array] = None):
    """Speculative sampling over rows.

    target_logprobs [B, K+1, V] are processed p. Accept d_i with prob min(1, p_i/q_i); at the
    first rejection sample from normalize(max(0, p - q)); if all K pass, sample the bonus
    token from p_K. Returns accepted count [B] and tokens [B, K+1] whose first
    `accepted + 1` entries are committed. keys [B, 2, 2]: per row, the keys of its accept
    draws and of its final token (None: the global stream).
    """
    u_keys, pick_keys = (None, None) if keys is None else (keys[:, 0], keys[:, 1])
    drafts = proposal.tokens
    B, k = drafts.shape
    if k == 0:
        return mx.zeros((B,), mx.int32), categorical(target_logprobs[:, 0], pick_keys)[:, None]
    p = mx.exp(target_logprobs)
    p_draft = mx.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, K]
    u = uniform(B, (k,), u_keys)
    accepted = mx.cumprod((u * proposal.q_draft < p_draft).astype(mx.int32), axis=1).sum(axis=1)

    row = accepted[:, None, None]
    p_n = mx.take_along_axis(p, row, axis=1)[:, 0]  # [B, V]
    at = mx.minimum(row, k - 1)
    q_n = mx.exp(mx.take_along_axis(proposal.q_logprobs, at, axis=1)[:, 0])  # [B, C]
    ids_n = None
    if proposal.q_ids is not None:
        ids_n = mx.take_along_axis(proposal.q_ids, at, axis=1)[:, 0]
    dist = mx.where(accepted[:, None] < k, _residual(p_n, q_n, ids_n), p_n)
    last = categorical(mx.log(dist), pick_keys)  # [B]
    tokens = mx.concatenate([drafts, last[:, None]], axis=1)
    tokens = mx.put_along_axis(tokens, accepted[:, None], last[:, None], axis=1)
    return accepted, tokens


def group_rows(settings: list) -> List[tuple]:
    """Rows with equal settings, as (setting, row indices), in order of first appearance."""
    groups = {}
    for r, s in enumerate(settings):
        groups.setdefault(s, []).append(r)
    return list(groups.items())


def regroup(parts: List[mx.array], groups: List[tuple]) -> mx.array:
    """Concatenated per-group results [sum G, ...] back in row order."""
    out = mx.concatenate(parts)
    order = [r for _, rows in groups for r in rows]
    if order == list(range(len(order))):
        return out
    inverse = [0] * len(order)
    for i, r in enumerate(order):
        inverse[r] = i
    return out[mx.array(inverse)]


def accept(target_logits: mx.array, proposal: Proposal, counts: List[int], params: list, keys: Optional[mx.array],
           histories: List[List[int]], allowed: Optional[mx.array] = None):
    """Verify every row by its own rule: accepted [B] and tokens [B, K+1].

    Row i considers only its first counts[i] drafts, with its own sampling settings
    params[i] (logits processors first, on the ids histories[i] + its drafts) and random
    keys keys[i] ([B, 2, 2], see `accept_sampled`): a row decides exactly as it would alone
    at that K. Rows with equal settings and counts share one graph. allowed [B, K+1, V]:
    the ids a grammar allows at each position (None: all).
    """
    target_logits = process_logits(target_logits, params, histories, proposal.tokens)
    if allowed is not None:
        target_logits = mx.where(allowed, target_logits, -mx.inf)
    if all(p.greedy for p in params):
        return accept_greedy(target_logits, proposal.tokens, mx.array(counts))
    K = proposal.k
    groups = group_rows(list(zip(params, counts)))
    accepted, tokens = [], []
    for (p, n), rows in groups:
        index = mx.array(rows)
        logits = target_logits[index, : n + 1]
        if p.greedy:
            a, t = accept_greedy(logits, proposal.tokens[index, :n])
        else:
            a, t = accept_sampled(log_probs(logits, p), proposal.rows(index, n), keys[index])
        accepted.append(a)
        tokens.append(mx.pad(t.astype(mx.uint32), [(0, 0), (0, K - n)]))
    return regroup(accepted, groups), regroup(tokens, groups)


def sample_candidates(q_logprobs: mx.array, ids: Optional[mx.array], greedy: bool, keys: Optional[mx.array] = None):
    """Pick one token per row from q [B, C]: (token ids [B], q of the token [B]); keys [B, 2]
    per row (None: the global stream)."""
    index = mx.argmax(q_logprobs, axis=-1) if greedy else categorical(q_logprobs, keys)
    q = mx.exp(mx.take_along_axis(q_logprobs, index[:, None], axis=-1)[:, 0])
    if ids is not None:
        index = mx.take_along_axis(ids, index[:, None], axis=-1)[:, 0]
    return index, q


def token_logprobs(logits: mx.array, tokens: mx.array, top: int):
    """Log-probabilities of `tokens` [B, T] under the raw distribution of `logits` [B, T, V]
    (before temperature and processors, as the model gives it), and the `top` most likely
    ids with theirs, most likely first: [B, T], and [B, T, top] ids and log-probs (None if
    top is 0)."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, tokens[..., None].astype(mx.int32), axis=-1)[..., 0]
    if top == 0:
        return chosen, None, None
    ids = mx.argpartition(-lp, top - 1, axis=-1)[..., :top]
    values = mx.take_along_axis(lp, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return chosen, mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)
