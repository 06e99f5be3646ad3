"""Batched MTP decoding: B sequences per round, each exactly as if it ran alone.

Every row keeps its own position. All rows draft K tokens and are verified in ONE target
forward over [B, K + 1]; each row then commits its own accepted prefix. Nothing is clamped
to the slowest row: a row's rejected entries simply lie past its own position in the
shared buffer, where its causal mask hides them, and are overwritten next round. Rows
that reach EOS or their token limit leave the batch.
"""

import time
from dataclasses import dataclass, field
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .cache import MAX_DRAFT_TOKENS
from .generate import GenerationResult, Pair, Stats, Throughput, check_lengths, encode, start
from .proposers import DraftContext
from .round import PREFILL_STEP, commit_length, draft_and_verify, pick_token, report
from .sampling import SamplingParams
from .target import SLIDING


class BatchCache(_BaseCache):
    """One layer's KV for B rows at their own positions; slot = position - start.

    Sliding layers drop the oldest positions that no row can see any more (the same
    `start` for all rows, so one buffer serves them all).
    """

    step = 256

    def __init__(self, batch: int, window: Optional[int] = None, slack: int = MAX_DRAFT_TOKENS + 2):
        self.positions = [0] * batch  # per row: positions stored
        self.window = window
        self.slack = slack
        self.start = 0
        self.keys = None
        self.values = None

    @property
    def offset(self) -> mx.array:  # mlx-lm models rope new tokens at cache.offset
        return mx.array(self.positions)

    def _needs_room(self, n: int) -> bool:
        return self.keys is None or max(self.positions) + n - self.start > self.keys.shape[2]

    def _start_after(self, n: int) -> int:
        if self.window is None or not self._needs_room(n):
            return self.start
        return max(self.start, min(self.positions) - self.window - self.slack)

    def update_and_fetch(self, keys, values):
        B, H, n, _ = keys.shape
        if self._needs_room(n):
            start = self._start_after(n)
            used = max(self.positions) - start
            new_k = mx.zeros((B, H, used + n + self.step, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((B, H, used + n + self.step, values.shape[3]), values.dtype)
            if self.keys is not None and used > 0:
                shift = start - self.start
                new_k[..., :used, :] = self.keys[..., shift : shift + used, :]
                new_v[..., :used, :] = self.values[..., shift : shift + used, :]
            self.keys, self.values, self.start = new_k, new_v, start
        slots = (mx.array(self.positions) - self.start)[:, None] + mx.arange(n)[None]  # [B, n]
        slots = slots[:, None, :, None]  # [B, 1, n, 1]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(slots, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(slots, values.shape), values, axis=2)
        self.positions = [p + n for p in self.positions]
        return self.keys_and_values()

    def keys_and_values(self):
        used = max(self.positions) - self.start
        return self.keys[..., :used, :], self.values[..., :used, :]

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array=False):
        start = self._start_after(N)
        k_pos = mx.arange(start, max(self.positions) + N)[None, None]  # [1, 1, S]
        q_pos = mx.array(self.positions)[:, None, None] + mx.arange(N)[None, :, None]  # [B, N, 1]
        mask = k_pos <= q_pos
        window = window_size or self.window
        if window:
            mask = mask & (k_pos > q_pos - window)
        return mask[:, None]  # [B, 1, N, S]

    def trim_rows(self, counts: List[int]):
        self.positions = [p - c for p, c in zip(self.positions, counts)]

    def keep_rows(self, rows: List[int]):
        index = mx.array(rows)
        self.keys, self.values = self.keys[index], self.values[index]
        self.positions = [self.positions[i] for i in rows]

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


@dataclass
class BatchStats(Throughput):
    """The batch as a whole: committed tokens over wall time, and rounds run."""

    rounds: int = 0
    live_rows: List[int] = field(default_factory=list)  # per round: rows in the forward


class BatchResults(list):
    """One `GenerationResult` per prompt, in order, plus `stats` for the batch."""

    def __init__(self, results, stats: BatchStats):
        super().__init__(results)
        self.stats = stats


def _make_caches(pair: Pair, batch: int):
    target = pair.target
    kinds = target.layer_types[: target.num_cached_layers]
    return [BatchCache(batch, target.sliding_window if k == SLIDING else None) for k in kinds]


def _prefill(pair: Pair, caches, prompts: List[List[int]], params: SamplingParams):
    """Right-pad, read all prompts at once, and pick each row's first token."""
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    padded = mx.array([p + [0] * (longest - len(p)) for p in prompts])
    hidden = []
    for s in range(0, longest, PREFILL_STEP):
        hidden.append(pair.target.hidden(padded[:, s : s + PREFILL_STEP], caches))
        mx.eval([c.keys for c in caches])
    hidden = mx.concatenate(hidden, axis=1)
    last = hidden[mx.arange(len(prompts)), mx.array(lengths) - 1][:, None]  # [B, 1, H]
    for c in caches:  # the padding lies past each row's position, hidden from now on
        c.trim_rows([longest - n for n in lengths])
    tokens = pick_token(pair.target.logits(last)[:, 0], params)
    mx.eval(tokens, last)
    return tokens.tolist(), last


def batch_generate(
    pair: Pair,
    prompts: List,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    num_draft_tokens: Optional[int] = None,
    seed: Optional[int] = None,
) -> BatchResults:
    """Generate for every prompt at once; row i's output is what `generate` gives alone.

    num_draft_tokens: K drafts every round, or None for the pair's default (the batched
    path does not choose K per round).
    """
    params = SamplingParams(temperature, top_p, top_k, min_p)
    k = check_lengths(pair, max_tokens, num_draft_tokens)
    if not prompts:
        raise ValueError("no prompts given")
    encoded = [encode(pair, p) for p in prompts]
    if any(not p for p in encoded):
        raise ValueError("a prompt is empty")
    context = pair.target.max_positions
    if context and max(len(p) for p in encoded) >= context:
        raise ValueError(f"a prompt needs more positions than the target's context ({context})")
    start(pair, seed)

    batch = BatchStats()
    stats = [Stats(prompt_tokens=len(p)) for p in encoded]
    history = [list(p) for p in encoded]
    generated: List[List[int]] = [[] for _ in encoded]
    limits = [min(max_tokens, context - len(p)) if context else max_tokens for p in encoded]
    caches = _make_caches(pair, len(encoded))

    tic = time.perf_counter()
    first, carry = _prefill(pair, caches, encoded, params)
    batch.prompt_time = time.perf_counter() - tic
    tic = time.perf_counter()
    rows = list(range(len(encoded)))  # original index of each live row
    for i, t in enumerate(first):
        history[i].append(t)
        generated[i].append(t)
    finish = [None] * len(encoded)

    while True:
        keep = []
        for r, i in enumerate(rows):
            if generated[i][-1] in pair.eos_ids:
                finish[i] = "stop"
            elif len(generated[i]) >= limits[i]:
                finish[i] = "length"
            else:
                keep.append(r)
        if len(keep) < len(rows):  # finished rows leave the batch
            if not keep:
                break
            for c in caches:
                c.keep_rows(keep)
            carry = carry[mx.array(keep)]
            rows = [rows[r] for r in keep]
        remaining = [limits[i] - len(generated[i]) for i in rows]
        carry = _batch_round(pair, caches, rows, history, generated, stats, carry, min(k, max(remaining) - 1), params, remaining)
        batch.rounds += 1
        batch.live_rows.append(len(rows))

    elapsed = time.perf_counter() - tic
    batch.generation_time = elapsed
    batch.generation_tokens = sum(len(g) for g in generated)
    results = []
    for i, tokens in enumerate(generated):
        stats[i].generation_tokens = len(tokens)
        stats[i].generation_time = elapsed
        stats[i].prompt_time = batch.prompt_time
        text = ""
        if pair.tokenizer is not None:
            text = pair.tokenizer.decode([t for t in tokens if t not in pair.eos_ids])
        results.append(GenerationResult(text, tokens, stats[i], finish[i]))
    return BatchResults(results, batch)


def _batch_round(pair, caches, rows, history, generated, stats, carry, k, params, remaining):
    """One round for the live rows; returns their next carry [B, 1, H]."""
    B = len(rows)
    token = mx.array([history[i][-1] for i in rows])
    positions = mx.array([len(history[i]) - 1 for i in rows])
    ctx = DraftContext(token, carry, positions, None, [history[i] for i in rows])
    proposal, hidden, accepted, out = draft_and_verify(pair.target, pair.proposer, ctx, caches, k, params)
    k = proposal.k

    accepted, out, drafts = accepted.tolist(), out.tolist(), proposal.tokens.tolist()
    cuts = []
    committed = [out[r][: accepted[r] + 1] for r in range(B)]
    sources = report(pair.proposer, proposal, accepted, committed)
    for r, i in enumerate(rows):
        cut = commit_length(committed[r], remaining[r], pair.eos_ids)
        cuts.append(cut)
        history[i] += committed[r][:cut]
        generated[i] += committed[r][:cut]
        stats[i].drafts.append(drafts[r])
        stats[i].accepted.append(accepted[r])
        stats[i].sources.append(sources[r])
    for c in caches:
        c.trim_rows([k + 1 - cut for cut in cuts])
    return hidden[mx.arange(B), mx.array(cuts) - 1][:, None]
