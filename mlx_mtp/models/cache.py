"""Target KV caches for rows at their own positions, that roll back rejected drafts exactly.

mlx-lm's `RotatingKVCache` overwrites its oldest slot in place: once it has wrapped, a
rejected draft can no longer be trimmed, and its slots are out of temporal order. Its
`BatchKVCache` left-pads rows to one length. Here one class serves every layer and any
number of rows: `BatchCache` keeps each row at its own position in one buffer, row r's
position p in slot p - starts[r], in temporal order, so trimming a row is moving its
position back, and masks are built from positions. A sliding layer drops, row by row, the
positions that row has moved past (its window plus `slack`): a row 8K positions in does
not make the rows beside it keep (and attend over) 8K positions.

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
        self.starts = [0] * rows  # per row: the position held in its slot 0
        self.window = window  # None: a full-attention layer keeps every position
        self.slack = slack
        self.keys = None  # [B, H, capacity, D]
        self.values = None

    @property
    def offset(self):
        """Where mlx-lm's models rope new tokens: an int for one row, else [B]."""
        if len(self.positions) == 1:
            return self.positions[0]
        return mx.array(self.positions)

    @property
    def used(self) -> int:
        """Slots holding a stored position, in the row that uses the most."""
        return max(p - s for p, s in zip(self.positions, self.starts))

    def _needs_room(self, n: int) -> bool:
        return self.keys is None or self.used + n > self.keys.shape[2]

    def _starts_after(self, n: int) -> List[int]:
        """Per row, the position of slot 0 once `n` more entries per row are stored."""
        if self.window is None or not self._needs_room(n):
            return self.starts
        return [max(s, p - self.window - self.slack) for p, s in zip(self.positions, self.starts)]

    def update_and_fetch(self, keys, values):
        B, H, n, _ = keys.shape
        if self._needs_room(n):
            starts = self._starts_after(n)
            used = max(p - s for p, s in zip(self.positions, starts))
            self._reallocate(starts, used + n + self.step, keys.dtype, keys.shape, values.shape)
        slots = [p - s for p, s in zip(self.positions, self.starts)]
        if all(slot == slots[0] for slot in slots):  # one row, or rows in step
            self.keys[..., slots[0] : slots[0] + n, :] = keys
            self.values[..., slots[0] : slots[0] + n, :] = values
        else:
            index = mx.array(slots)[:, None] + mx.arange(n)[None]  # [B, n]
            index = index[:, None, :, None]  # [B, 1, n, 1]
            self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(index, keys.shape), keys, axis=2)
            self.values = mx.put_along_axis(self.values, mx.broadcast_to(index, values.shape), values, axis=2)
        self.positions = [p + n for p in self.positions]
        return self.keys_and_values()

    def _reallocate(self, starts: List[int], capacity: int, dtype, k_shape, v_shape):
        """New buffers holding each row from its new start on."""
        B, H, _, Dk = k_shape
        new_k = mx.zeros((B, H, capacity, Dk), dtype)
        new_v = mx.zeros((B, H, capacity, v_shape[3]), dtype)
        if self.keys is not None:
            shifts = [new - old for new, old in zip(starts, self.starts)]
            used = max(p - s for p, s in zip(self.positions, starts))
            if all(shift == shifts[0] for shift in shifts):  # rows in step: one copy
                new_k[..., :used, :] = self.keys[..., shifts[0] : shifts[0] + used, :]
                new_v[..., :used, :] = self.values[..., shifts[0] : shifts[0] + used, :]
            else:
                for r, (p, s, shift) in enumerate(zip(self.positions, starts, shifts)):
                    new_k[r, :, : p - s, :] = self.keys[r, :, shift : shift + p - s, :]
                    new_v[r, :, : p - s, :] = self.values[r, :, shift : shift + p - s, :]
        self.keys, self.values, self.starts = new_k, new_v, list(starts)

    def keys_and_values(self):
        return self.keys[..., : self.used, :], self.values[..., : self.used, :]

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array=False, blocks=None):
        """Mask for N new queries per row over the keys the next update returns. blocks:
        [B, N] int, the image each new position belongs to (-1: none), to attend both ways
        within an image (all of it among the N: an image is never split)."""
        window = window_size or self.window
        starts = self._starts_after(N)
        S = max(p - s for p, s in zip(self.positions, starts)) + N
        if len(self.positions) == 1 and not return_array and blocks is None:
            # One row: every stored key is committed; mlx-lm's fused paths where they apply.
            if not window or S <= window:
                return None if N == 1 else "causal"
        k_pos = mx.array(starts)[:, None, None] + mx.arange(S)[None, None]  # [B, 1, S]
        q_pos = mx.array(self.positions)[:, None, None] + mx.arange(N)[None, :, None]  # [B, N, 1]
        mask = k_pos <= q_pos
        if blocks is not None:
            new = k_pos - mx.array(self.positions)[:, None, None]  # [B, 1, S]: index among the N, if >= 0
            k_block = mx.take_along_axis(blocks, mx.maximum(new[:, 0], 0), axis=1)[:, None]  # [B, 1, S]
            k_block = mx.where(new >= 0, k_block, -1)
            mask = mask | ((k_block == blocks[:, :, None]) & (k_block >= 0))
        if window:
            mask = mask & (k_pos > q_pos - window)
        return mask[:, None]  # [B, 1, N, S]

    # Rows: trim, rewind, keep, join, take out.

    def trim_rows(self, counts: List[int]):
        """Forget each row's newest `counts[i]` positions (rejected drafts)."""
        positions = [p - c for p, c in zip(self.positions, counts)]
        if any(p < s for p, s in zip(positions, self.starts)):
            raise RuntimeError("trimmed past the positions this cache still holds")
        self.positions = positions

    def can_rewind(self, position: int) -> bool:
        """Whether this one-row cache, moved back so that `position` is the next one
        written, still holds what a forward there reads: every earlier position, or for a
        sliding layer the window before it, the drafter's one extra position and one to
        spare."""
        needed = 0 if self.window is None else max(0, position - self.window - 2)
        return self.starts[0] <= needed

    def rewind(self, position: int):
        """Move this one-row cache back so that `position` is the next one written."""
        self.trim_rows([self.positions[0] - position])

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        n = min(n, min(p - s for p, s in zip(self.positions, self.starts)))
        self.positions = [p - n for p in self.positions]
        return n

    def keep_rows(self, rows: List[int]):
        """Keep only these rows, in this order."""
        if rows == list(range(len(self.positions))):
            return
        self.positions = [self.positions[i] for i in rows]
        self.starts = [self.starts[i] for i in rows]
        if not rows:
            self.keys = self.values = None
        elif self.keys is not None:
            index = mx.array(rows)
            self.keys, self.values = self.keys[index], self.values[index]

    def extend(self, other: "BatchCache"):
        """Append `other`'s rows after this cache's (a row joining the batch). Each row
        keeps its own start: only the capacity is shared."""
        if self.keys is None or not self.positions:
            self.positions = self.positions + other.positions
            self.keys, self.values, self.starts = other.keys, other.values, list(other.starts)
            return
        B, H, _, Dk = self.keys.shape
        capacity = max(self.used, other.used) + self.step
        shape = (B + other.keys.shape[0], H, capacity)
        keys = mx.zeros((*shape, Dk), self.keys.dtype)
        values = mx.zeros((*shape, self.values.shape[3]), self.values.dtype)
        for rows, cache in ((slice(0, B), self), (slice(B, None), other)):
            keys[rows, :, : cache.used, :], values[rows, :, : cache.used, :] = cache.keys_and_values()
        self.keys, self.values = keys, values
        self.positions = self.positions + other.positions
        self.starts = self.starts + other.starts

    def extract(self, row: int) -> "BatchCache":
        """One row as a cache of its own (a copy of what it needs)."""
        out = BatchCache(1, self.window, self.slack)
        position, start = self.positions[row], self.starts[row]
        first = 0 if self.window is None else max(0, position - self.window - self.slack - start)
        out.keys = self.keys[row : row + 1, :, first : position - start, :]
        out.values = self.values[row : row + 1, :, first : position - start, :]
        out.positions, out.starts = [position], [start + first]
        return out

    def copy(self) -> "BatchCache":
        """A cache of its own over the same arrays (the stored prefix is never written)."""
        out = BatchCache(len(self.positions), self.window, self.slack)
        out.keys, out.values = self.keys, self.values
        out.starts, out.positions = list(self.starts), list(self.positions)
        return out

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def shared_kv_view(cache: BatchCache):
    """(keys, values, first positions) of a target cache: views, never copies. The first
    positions: an int for one row, else [B] (each row's slot 0)."""
    keys, values = cache.keys_and_values()
    return keys, values, cache.starts[0] if len(cache.starts) == 1 else mx.array(cache.starts)


__all__ = ["BatchCache", "shared_kv_view", "MAX_DRAFT_TOKENS"]
