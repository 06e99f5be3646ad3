"""The drafter's clustered sparse head, and the candidate sets both heads return.

Both return `Candidates`: logits over a set of token ids. The dense head's set is the whole
vocabulary (`ids is None`); the clustered head's is the tokens of its top-k clusters.
Nothing is scattered back into a full-vocabulary tensor: tokens outside the candidate set
simply have drafter probability 0.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Candidates:
    logits: mx.array  # [B, C]
    ids: Optional[mx.array] = None  # [B, C] token ids, or None for the full vocabulary


class ClusteredHead(nn.Module):
    """Two-stage head: centroid logits pick clusters, then only their tokens are scored.

    `token_ordering` is a permutation of the vocabulary, viewed as
    [num_centroids, vocab / num_centroids]: row c lists the tokens of cluster c.
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_centroids: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.num_centroids = num_centroids
        self.centroids = nn.Linear(hidden_size, num_centroids, bias=False)
        self.token_ordering = mx.zeros((vocab_size,), dtype=mx.int32)

    def __call__(self, h: mx.array, embedding: nn.Module) -> Candidates:
        # h: [B, H]
        centroid_logits = self.centroids(h)  # [B, num_centroids]
        top = mx.argpartition(-centroid_logits, kth=self.top_k - 1, axis=-1)[:, : self.top_k]
        clusters = self.token_ordering.reshape(self.num_centroids, -1)  # [N, V/N]
        ids = clusters[top].reshape(h.shape[0], -1)  # [B, top_k * V/N]
        # One gather per row: its [C, H] rows (dequantized for a quantized embedding) are
        # still in cache for the product; one [B, C, H] gather spills them and cost 2.7x as
        # much at B = 8 on a 2-core CPU.
        logits = mx.stack([embedding(ids[i]) @ h[i] for i in range(h.shape[0])])  # [B, C]
        return Candidates(logits, ids)
