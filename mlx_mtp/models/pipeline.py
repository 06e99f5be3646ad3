"""A target pipeline-sharded over the ranks of `mlx.launch` (mx.distributed, ring backend).

Each rank holds a contiguous range of the target's layers. As in mlx-lm's pipelines, rank 0
holds the LAST layers: it has the final norm, the head and the drafter (with the layers whose
KV the drafter reads), and it is the rank that talks to the user. The highest rank holds the
first layers and the embedding.

Every rank runs the same engine code on the same inputs; only where arrays come from differs:
- a target forward is one pass: each stage receives the hidden state from the stage before,
  runs its layers and sends the result on; only rank 0 has the final hidden state;
- rank 0's drafts and its accept decision reach every rank through `share` (a sum in which
  the other ranks add zeros), so every rank commits the same ids and trims its caches alike;
- collectives are scheduled in the same order on every rank: the drafts' share is scheduled
  before the verify forward is built, else rank 0 could wait on the next stage's hidden state
  while that stage waits on rank 0's drafts.
"""

import functools
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


class PipelineError(ValueError):
    """A pipeline that cannot hold this pair (every rank finds the same); one line."""


@dataclass
class Pipeline:
    group: object  # mx.distributed.Group of the ranks
    start: int = 0  # this rank's layers: [start, end)
    end: int = 0
    ranges: Tuple[Tuple[int, int], ...] = ()  # every rank's layers

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def first(self) -> bool:
        """Holds the first layers (reads the tokens)."""
        return self.rank == self.size - 1

    @property
    def last(self) -> bool:
        """Holds the last layers, the head and the drafter."""
        return self.rank == 0

    def share(self, x: mx.array, after: Optional[mx.array] = None) -> mx.array:
        """Rank 0's `x` on every rank (the others pass any array of its shape and dtype:
        they must match on every rank, or the ranks read each other's bytes wrongly).
        `after`: what this rank must have computed first (its stage of a forward), so
        that evaluating the result runs that stage too, in order."""
        if not self.last:
            x = mx.zeros(x.shape, x.dtype)
            if after is not None:
                x = mx.depends(x, after)
        return mx.distributed.all_sum(x, group=self.group)

    def agree(self, values: List[float]) -> List[float]:
        """Rank 0's host values on every rank (costs, decisions): one sync."""
        return self.share(mx.array(values, mx.float32)).tolist()

    def share_json(self, obj=None):
        """Rank 0's JSON-able `obj` on every rank (the others pass None): its size, then, if
        rank 0 has anything (not None), its bytes. None costs one sync, not two."""
        data = json.dumps(obj).encode() if self.last and obj is not None else b""
        size = self.share(mx.array([len(data)], mx.int32)).item()
        if not size:
            return None
        buffer = mx.array(np.frombuffer(data, np.uint8)) if self.last else mx.zeros((size,), mx.uint8)
        return json.loads(bytes(self.share(buffer).tolist()))

    def send(self, x: mx.array) -> mx.array:
        return mx.distributed.send(x, self.rank - 1, group=self.group)

    def recv(self, shape, dtype) -> mx.array:
        return mx.distributed.recv(shape, dtype, self.rank + 1, group=self.group)


def launched() -> bool:
    """Started by `mlx.launch` (or with its environment set by hand)."""
    return "MLX_RANK" in os.environ


@functools.lru_cache(maxsize=None)
def init() -> Optional[Pipeline]:
    """The pipeline of this launch, or None in a single process."""
    if not launched():
        return None
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as e:
        # Only the ranks that connect find out (the others wait for them): each says so itself.
        raise ConnectionError(f"cannot reach the other ranks ({' '.join(str(e).split())}): check the hostfile's "
                        "addresses and that every rank was started") from None
    return Pipeline(group) if group.size() > 1 else None


def layer_ranges(num_layers: int, ranks: int, tail_from: Optional[int]) -> List[Tuple[int, int]]:
    """Contiguous layer ranges, by rank (rank 0: the last layers), as even as possible; the
    last layers from `tail_from` on stay together on rank 0 (the layers whose KV the drafter
    reads, and KV-sharing layers with the layers they read)."""
    if ranks > num_layers:
        raise PipelineError(f"cannot split the target's {num_layers} layers over {ranks} ranks")
    tail = num_layers // ranks + (num_layers % ranks > 0)  # rank 0 takes the remainder first
    start = num_layers - tail if tail_from is None else min(num_layers - tail, tail_from)
    if start < ranks - 1:
        raise PipelineError(
            f"cannot split the target's {num_layers} layers over {ranks} ranks: rank 0 must hold layers "
            f"{tail_from}..{num_layers - 1} (the drafter reads their KV, or later layers share it), "
            f"which leaves {start} for {ranks - 1} ranks"
        )
    ends = [start * (ranks - 1 - r) // (ranks - 1) for r in range(1, ranks)] if ranks > 1 else []
    bounds = [num_layers, start] + ends  # rank r holds [bounds[r + 1], bounds[r])
    return [(bounds[r + 1], bounds[r]) for r in range(ranks)]


def weight_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def describe(pipeline: Pipeline, nbytes: int) -> dict:
    """Every rank's layer range and bytes of target weights (gathered: every rank calls it)."""
    mine = mx.array([pipeline.start, pipeline.end, nbytes], mx.int64)
    table = mx.distributed.all_gather(mine[None], group=pipeline.group).tolist()  # [size, 3]
    ranks = [{"rank": r, "layers": [a, b - 1], "weight_bytes": n} for r, (a, b, n) in enumerate(table)]
    return {"world_size": pipeline.size, "ranks": ranks}
