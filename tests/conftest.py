"""Shared helpers: the committed tiny fixtures, the plain mlx-lm baseline, test proposers."""

import random
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step

import mlx_mtp
from mlx_mtp.decoding.proposers import StatelessProposer, deterministic

FIXTURES = Path(__file__).parent / "fixtures"
PAIRS = {
    "e2b": ("target_e2b", "drafter_sparse"),  # kv-shared layers, per-layer inputs, sparse head
    "31b": ("target_31b", "drafter_dense"),  # attention_k_eq_v, dense tied head
    "moe": ("target_moe", "drafter_moe"),  # 26B-A4B-like mixture of experts
}
WINDOW = 8  # the fixtures' sliding window
# mlx-lm's prompt chunk: prompts past it are read in chunks by plain decoding too (and in
# many chunks by the engine, whose prefill step is at most this)
MLX_LM_PREFILL = 2048


@lru_cache(maxsize=None)
def load_pair(name: str) -> mlx_mtp.Pair:
    target, drafter = PAIRS[name]
    return mlx_mtp.load(str(FIXTURES / target), str(FIXTURES / drafter))


def prompt_of(length: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(length)]


def plain_greedy(model, prompt: list, max_tokens: int, eos=frozenset({1}), logits_processors=None) -> list:
    """What plain mlx-lm decoding gives (its own caches, one token per forward), through
    the EOS that stops it, as mlx-lm's stream_generate yields it."""
    tokens = []
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, logits_processors=logits_processors)
    for token, _ in steps:
        tokens.append(token)
        if token in eos:
            break
    return tokens


class ContinuationProposer(StatelessProposer):
    """Proposes a known continuation, corrupting each token with probability `noise`:
    exercises every accept length, which a random drafter (accepting ~nothing) cannot."""

    name = "oracle"

    def __init__(self, sequences, noise: float, seed: int = 0):
        self.sequences = [list(s) for s in sequences]
        self.noise = noise
        self.rng = random.Random(seed)

    def _next(self, history, k):
        full = next((s for s in self.sequences if s[: len(history)] == history), [])
        n = len(history)
        return [
            full[n + i] if n + i < len(full) and self.rng.random() >= self.noise else 4
            for i in range(k)
        ]

    def propose(self, ctx, k):
        return deterministic(mx.array([self._next(h, k) for h in ctx.history]))


class NoisyTargetProposer(StatelessProposer):
    """Samples drafts from q = the target's own distribution with fixed logit noise: q is
    close to p, so most drafts are accepted and most rejections land on likely tokens.
    Rows of one round share their draws (rows of a sampling test are independent anyway)."""

    name = "noisy-target"

    def __init__(self, model, noise: float, seed: int = 0):
        self.model = model
        self.noise = noise
        self.key = mx.random.key(seed)

    def propose(self, ctx, k):
        from mlx_mtp.decoding.sampling import Proposal

        rows = range(len(ctx.history))
        by_length = {}  # rows of equal history length share one forward
        for r in rows:
            by_length.setdefault(len(ctx.history[r]), []).append(r)
        parts = {}
        for group in by_length.values():
            out = self._propose_equal(mx.array([ctx.history[r] for r in group]), k, ctx.params[0])
            parts.update({r: [x[i : i + 1] for x in out] for i, r in enumerate(group)})
        return Proposal(*(mx.concatenate([parts[r][j] for r in rows]) for j in range(3)))

    def _propose_equal(self, history, k, params):
        from mlx_mtp.decoding.sampling import log_probs, sample_candidates

        tokens, q_draft, q_logprobs = [], [], []
        for i in range(k):
            logits = self.model(history)[:, -1]
            logits = logits + self.noise * mx.random.normal(logits.shape[-1:], key=mx.random.split(self.key, k)[i])
            logprobs = log_probs(logits, params)
            token, q = sample_candidates(logprobs, None, params.greedy)
            tokens.append(token)
            q_draft.append(q)
            q_logprobs.append(logprobs)
            history = mx.concatenate([history, token[:, None]], axis=1)
        return mx.stack(tokens, 1), mx.stack(q_draft, 1), mx.stack(q_logprobs, 1)
