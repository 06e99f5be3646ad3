"""Target KV caches that can roll back rejected drafts, also past the sliding window.

mlx-lm's `RotatingKVCache` overwrites its oldest slot in place: once it has wrapped, a
rejected draft can no longer be trimmed, and its slots are out of temporal order. The
sliding layers here use `SlidingKVCache` instead: it keeps the newest `window + slack`
positions contiguous and in order, so `trim(n)` is exact for any n up to `slack`, and
masks are built from positions. Full-attention layers use mlx-lm's `KVCache` as is.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache

# Slack for rollback: the longest draft the loop may verify, plus the drafter's extra
# position (it sees W + 1 target positions, one more than the target's own window).
MAX_DRAFT_TOKENS = 16


class SlidingKVCache(_BaseCache):
    step = 256

    def __init__(self, window: int, slack: int = MAX_DRAFT_TOKENS + 2):
        self.window = window
        self.slack = slack
        self.keys = None
        self.values = None
        self.offset = 0  # positions seen so far
        self.start = 0  # position held in slot 0

    def _needs_room(self, n: int) -> bool:
        return self.keys is None or self.offset - self.start + n > self.keys.shape[2]

    def _start_after(self, n: int) -> int:
        """Position of slot 0 once `n` more entries are stored."""
        if self._needs_room(n):
            return self.offset - min(self.offset - self.start, self.window + self.slack)
        return self.start

    def update_and_fetch(self, keys, values):
        n = keys.shape[2]
        if self._needs_room(n):
            start = self._start_after(n)
            # Reallocate, dropping positions no query and no rollback can reach.
            B, H, _, Dk = keys.shape
            kept = self.offset - start
            capacity = kept + n + self.step
            new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
            new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
            if kept:
                size = self.offset - self.start
                new_k[..., :kept, :] = self.keys[..., size - kept : size, :]
                new_v[..., :kept, :] = self.values[..., size - kept : size, :]
            self.keys, self.values, self.start = new_k, new_v, start
        size = self.offset - self.start
        self.keys[..., size : size + n, :] = keys
        self.values[..., size : size + n, :] = values
        self.offset += n
        return self.keys_and_values()

    def keys_and_values(self):
        size = self.offset - self.start
        return self.keys[..., :size, :], self.values[..., :size, :]

    def size(self):
        return self.offset - self.start

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.start

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.start = v

    def is_trimmable(self):
        return True

    def trim(self, n):
        # Exact while the newest `window` positions stay stored: up to `slack` beyond
        # what the last update appended.
        n = min(self.offset - self.start, n)
        self.offset -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array=False):
        """Mask for N new queries at positions offset..offset+N-1 over the stored keys."""
        window = window_size or self.window
        start = self._start_after(N)
        num_keys = self.offset + N - start
        if N == 1 and num_keys <= window and not return_array:
            return None
        q = mx.arange(self.offset, self.offset + N)[:, None]
        k = mx.arange(start, start + num_keys)[None]
        return (k <= q) & (k > q - window)

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


def shared_kv_view(cache):
    """(keys, values, first_position) of a target cache: views, never copies."""
    keys, values = cache.keys_and_values()
    first = getattr(cache, "start", 0)  # KVCache always holds position 0 onwards
    return keys, values, first


def trim(caches, n: int):
    if n > 0:
        for c in caches:
            c.trim(n)


__all__ = ["KVCache", "SlidingKVCache", "shared_kv_view", "trim", "MAX_DRAFT_TOKENS"]
