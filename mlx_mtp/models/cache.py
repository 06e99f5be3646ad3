"""Target KV caches for rows at their own positions, that roll back rejected drafts exactly.

mlx-lm's `RotatingKVCache` overwrites its oldest slot in place: once it has wrapped, a
rejected draft can no longer be trimmed, and its slots are out of temporal order. Its
`BatchKVCache` left-pads rows to one length. Here one class serves every layer and any
number of rows: `BatchCache` keeps each row at its own position in one buffer (slot =
position - start), in temporal order, so trimming a row is moving its position back, and
masks are built from positions. A sliding layer drops only the positions that EVERY row has
moved past by its own position (its window plus `slack`); padding never decides it.

Entries past a row's position are garbage: hidden by the row's mask, overwritten later.
Writes only ever land at or past a row's position, so the stored prefix is never changed
and a saved cache (a conversation) can share its arrays with a live one.
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

# Slack for rollback: the longest draft the loop may verify, plus the drafter's extra
# position (it sees W + 1 target positions, one more than the target's own window).
MAX_DRAFT_TOKENS = 16
SLACK = MAX_DRAFT_TOKENS + 2


class BatchCache(_BaseCache):
    step = 256

    def __init__(self, rows: int = 1, window: Optional[int] = None, slack: int = SLACK):
        self.positions = [0] * rows  # per row: positions stored
        self.window = window  # None: a full-attention layer keeps every position
        self.slack = slack
        self.start = 0  # position held in slot 0
        self.keys = None  # [B, H, capacity, D]
        self.values = None

    @property
    def offset(self):
        """Where mlx-lm's models rope new tokens: an int for one row, else [B]."""
        if len(self.positions) == 1:
            return self.positions[0]
        return mx.array(self.positions)

    def _needs_room(self, n: int) -> bool:
        return self.keys is None or max(self.positions) + n - self.start > self.keys.shape[2]

    def _start_after(self, n: int) -> int:
        """Position of slot 0 once `n` more entries per row are stored."""
        if self.window is None or not self._needs_room(n):
            return self.start
        return max(self.start, min(self.positions) - self.window - self.slack)

    def update_and_fetch(self, keys, values):
        B, H, n, _ = keys.shape
        if self._needs_room(n):
            start = self._start_after(n)
            used = max(self.positions) - start
            self._reallocate(start, used, used + n + self.step, keys.dtype, keys.shape, values.shape)
        first = self.positions[0] - self.start
        if all(p == self.positions[0] for p in self.positions):  # one row, or rows in step
            self.keys[..., first : first + n, :] = keys
            self.values[..., first : first + n, :] = values
        else:
            slots = (mx.array(self.positions) - self.start)[:, None] + mx.arange(n)[None]  # [B, n]
            slots = slots[:, None, :, None]  # [B, 1, n, 1]
            self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(slots, keys.shape), keys, axis=2)
            self.values = mx.put_along_axis(self.values, mx.broadcast_to(slots, values.shape), values, axis=2)
        self.positions = [p + n for p in self.positions]
        return self.keys_and_values()

    def _reallocate(self, start: int, used: int, capacity: int, dtype, k_shape, v_shape):
        """New buffers from position `start`, keeping `used` slots of the old ones."""
        B, H, _, Dk = k_shape
        new_k = mx.zeros((B, H, capacity, Dk), dtype)
        new_v = mx.zeros((B, H, capacity, v_shape[3]), dtype)
        if self.keys is not None and used > 0:
            shift = start - self.start
            new_k[..., :used, :] = self.keys[..., shift : shift + used, :]
            new_v[..., :used, :] = self.values[..., shift : shift + used, :]
        self.keys, self.values, self.start = new_k, new_v, start

    def keys_and_values(self):
        used = max(self.positions) - self.start
        return self.keys[..., :used, :], self.values[..., :used, :]

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array=False):
        """Mask for N new queries per row over the keys the next update returns."""
        window = window_size or self.window
        start = self._start_after(N)
        end = max(self.positions) + N
        if len(self.positions) == 1 and not return_array:
            # One row: every stored key is committed; mlx-lm's fused paths where they apply.
            if not window or end - start <= window:
                return None if N == 1 else "causal"
        k_pos = mx.arange(start, end)[None, None]  # [1, 1, S]
        q_pos = mx.array(self.positions)[:, None, None] + mx.arange(N)[None, :, None]  # [B, N, 1]
        mask = k_pos <= q_pos
        if window:
            mask = mask & (k_pos > q_pos - window)
        return mask[:, None]  # [B, 1, N, S]

    # Rows: trim, rewind, keep, join, take out.

    def trim_rows(self, counts: List[int]):
        """Forget each row's newest `counts[i]` positions (rejected drafts)."""
        positions = [p - c for p, c in zip(self.positions, counts)]
        if any(p < self.start for p in positions):
            raise RuntimeError("trimmed past the positions this cache still holds")
        self.positions = positions

    def can_rewind(self, position: int) -> bool:
        """Whether this one-row cache, moved back so that `position` is the next one
        written, still holds what a forward there reads: every earlier position, or for a
        sliding layer the window before it, the drafter's one extra position and one to
        spare."""
        needed = 0 if self.window is None else max(0, position - self.window - 2)
        return self.start <= needed

    def rewind(self, position: int):
        """Move this one-row cache back so that `position` is the next one written."""
        self.trim_rows([self.positions[0] - position])

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        n = min(n, min(self.positions) - self.start)
        self.positions = [p - n for p in self.positions]
        return n

    def keep_rows(self, rows: List[int]):
        """Keep only these rows, in this order."""
        if rows == list(range(len(self.positions))):
            return
        self.positions = [self.positions[i] for i in rows]
        if not rows:
            self.keys = self.values = None
            self.start = 0
        elif self.keys is not None:
            index = mx.array(rows)
            self.keys, self.values = self.keys[index], self.values[index]

    def extend(self, other: "BatchCache"):
        """Append `other`'s rows after this cache's (a row joining the batch)."""
        if self.keys is None or not self.positions:
            self.positions = self.positions + other.positions
            self.keys, self.values, self.start = other.keys, other.values, other.start
            return
        start = min(self.start, other.start)
        end = max(self.positions + other.positions)
        B, H, _, Dk = self.keys.shape
        capacity = end - start + self.step
        shape = (B + other.keys.shape[0], H, capacity)
        keys = mx.zeros((*shape, Dk), self.keys.dtype)
        values = mx.zeros((*shape, self.values.shape[3]), self.values.dtype)
        for rows, cache in ((slice(0, B), self), (slice(B, None), other)):
            used = max(cache.positions) - cache.start
            at = cache.start - start
            keys[rows, :, at : at + used, :] = cache.keys[..., :used, :]
            values[rows, :, at : at + used, :] = cache.values[..., :used, :]
        self.keys, self.values, self.start = keys, values, start
        self.positions = self.positions + other.positions

    def extract(self, row: int) -> "BatchCache":
        """One row as a cache of its own (a copy of what it needs)."""
        out = BatchCache(1, self.window, self.slack)
        position = self.positions[row]
        start = self.start
        if self.window is not None:
            start = max(start, position - self.window - self.slack)
        first = start - self.start
        out.keys = self.keys[row : row + 1, :, first : position - self.start, :]
        out.values = self.values[row : row + 1, :, first : position - self.start, :]
        out.positions, out.start = [position], start
        return out

    def copy(self) -> "BatchCache":
        """A cache of its own over the same arrays (the stored prefix is never written)."""
        out = BatchCache(len(self.positions), self.window, self.slack)
        out.keys, out.values, out.start, out.positions = self.keys, self.values, self.start, list(self.positions)
        return out

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def shared_kv_view(cache: BatchCache):
    """(keys, values, first_position) of a target cache: views, never copies."""
    keys, values = cache.keys_and_values()
    return keys, values, cache.start


__all__ = ["BatchCache", "shared_kv_view", "MAX_DRAFT_TOKENS"]
