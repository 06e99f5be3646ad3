"""Adapter over an mlx-lm Gemma model (gemma4, gemma4_text, gemma3_text) as a verifier.

One forward gives the post-final-norm hidden states and, only where asked, the logits. The
adapter owns the caches (rollback-capable, see cache.py) and exposes the KV arrays of the
last non-shared sliding and full layers: the arrays an MTP drafter cross-attends to.
"""

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from .cache import BatchCache, shared_kv_view
from .cpu import for_cpu, on_cpu
from .products import product
from .pipeline import Pipeline, layer_ranges

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ChunkImages:
    """The images' soft tokens in a chunk of prompt ids (whose ids there are the pad id, as
    transformers reads them for the per-layer inputs)."""

    at: mx.array  # [B, T] bool: the positions holding a soft token
    embeddings: mx.array  # [B, T, H]: the vision tower's embedding there (anything elsewhere)
    # [B, T] int32: which image a position belongs to (-1: text), where a target's sliding
    # layers attend both ways within an image (Gemma 4 26B and 31B); None: causal everywhere
    blocks: Optional[mx.array] = None


@partial(mx.compile, shapeless=True)
def _softcap(x, cap):
    return mx.tanh(x / cap) * cap


class Target:
    def __init__(self, model: nn.Module, pipeline: Optional[Pipeline] = None, drafter: bool = False):
        """pipeline: hold only this rank's layers (see pipeline.py); `drafter`: a drafter
        will read the KV of the last non-shared layers, so they stay on rank 0."""
        self.model = model
        self.lm = getattr(model, "language_model", model)  # gemma4 wraps its text model
        args = self.lm.args
        self.args = args
        self.model_type = args.model_type
        self.hidden_size = args.hidden_size
        self.vocab_size = args.vocab_size
        self.sliding_window = args.sliding_window
        self.max_positions = getattr(args, "max_position_embeddings", None)
        if getattr(args, "layer_types", None):
            self.layer_types = list(args.layer_types)
        else:  # gemma3_text: every `sliding_window_pattern`-th layer is global
            n = args.sliding_window_pattern
            self.layer_types = [
                FULL if i % n == n - 1 else SLIDING for i in range(args.num_hidden_layers)
            ]
        self.num_cached_layers = args.num_hidden_layers - getattr(args, "num_kv_shared_layers", 0)
        own = self.layer_types[: self.num_cached_layers]
        # The drafter reads the KV of the LAST non-shared layer of each kind.
        self.shared_layer = {
            kind: max(i for i, t in enumerate(own) if t == kind) for kind in set(own)
        }
        self.softcap = getattr(self.lm, "final_logit_softcapping", None)
        # The norm is never quantized: the dtype activations and KV arrays have.
        self.dtype = self.lm.model.norm.weight.dtype
        # The input embedding's scale as mlx-lm's model applies it (made once: `embed` runs in
        # every drafter step): gemma3 rounds sqrt(hidden) to bfloat16, gemma4 has its own.
        if self.model_type == "gemma3_text":
            self.embed_scale = mx.array(self.hidden_size**0.5, mx.bfloat16).astype(self.dtype)
        else:
            self.embed_scale = self.lm.model.embed_scale
        self.vision = None  # images.Vision of a multimodal checkpoint (set by the loader)
        self.pipeline = pipeline
        self.layers = range(len(self.layer_types))  # the layers this process holds
        self.weight_bytes = 0  # in a pipeline: of the weights this rank holds
        if pipeline is not None:
            self._shard(pipeline, drafter)
        # Measured on the CPU only; with Metal, mlx-lm's own layers run unchanged.
        self.cpu_kernels = on_cpu()
        self.decoder = for_cpu(self.lm.model) if self.cpu_kernels else self.lm.model

    def _shard(self, pipeline: Pipeline, drafter: bool):
        """Keep this rank's layers (and the embedding, norm and head where they are used);
        the rest is dropped before any weight is read."""
        shares_kv = self.num_cached_layers < len(self.layer_types)
        tail = min(self.shared_layer.values()) if drafter or shares_kv else None
        pipeline.ranges = tuple(layer_ranges(len(self.layer_types), pipeline.size, tail))
        pipeline.start, pipeline.end = pipeline.ranges[pipeline.rank]
        self.layers = range(pipeline.start, pipeline.end)
        model = self.lm.model
        for i in range(len(model.layers)):
            if i not in self.layers:
                model.layers[i] = None
        if not (pipeline.first or pipeline.last):  # rank 0 keeps it as the (tied) head
            model.embed_tokens = None
        if not pipeline.last:
            model.norm = None
        if not pipeline.first:  # E2B/E4B: the first stage sends the per-layer inputs along
            for name in ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm"):
                if getattr(model, name, None) is not None:
                    setattr(model, name, None)
        if not pipeline.last and "lm_head" in self.lm:
            self.lm.lm_head = None

    def make_cache(self, rows: int = 1):
        """One cache per held layer that has its own KV."""
        return [
            BatchCache(rows, self.sliding_window if self.layer_types[i] == SLIDING else None)
            for i in self.layers
            if i < self.num_cached_layers
        ]

    def hidden(self, tokens: mx.array, cache, images: Optional[ChunkImages] = None) -> mx.array:
        """[B, T] new tokens -> [B, T, H] post-norm hidden states; extends the cache. In a
        pipeline, only rank 0 has them: the other ranks get what they sent on."""
        if self.pipeline is None and images is None:
            return self.decoder(tokens, cache=cache)
        return self._stage_hidden(tokens, cache, images)

    def _stage_hidden(self, tokens: mx.array, cache, images: Optional[ChunkImages] = None) -> mx.array:
        """This rank's part of the forward (all of it outside a pipeline), as mlx-lm's
        gemma3_text / gemma4_text models compute it for these layers; with `images`, as
        transformers' Gemma 4 computes a prompt with images."""
        p, model = self.pipeline, self.decoder
        first, last, start = (True, True, 0) if p is None else (p.first, p.last, p.start)
        B, T = tokens.shape
        H = self.hidden_size
        P = getattr(model, "hidden_size_per_layer_input", 0) or 0  # E2B/E4B per-layer inputs
        L = len(self.layer_types)
        if first:
            h = self.embed(tokens)
            if images is not None:  # soft tokens take the vision tower's embeddings, unscaled
                h = mx.where(images.at[..., None], images.embeddings.astype(h.dtype), h)
            per_layer = model._project_per_layer_inputs(h, model._get_per_layer_inputs(tokens)) if P else None
        else:
            x = p.recv((B, T, H + L * P), self.dtype)
            h = x[..., :H]
            per_layer = x[..., H:].reshape(B, T, L, P) if P else None  # [B, T, L * P] -> [B, T, L, P]
        masks = {}
        for i, c in zip([i for i in self.layers if i < self.num_cached_layers], cache):
            kind = self.layer_types[i]
            if kind in masks:
                continue
            window = self.sliding_window if kind == SLIDING else None
            if window and images is not None and images.blocks is not None:
                masks[kind] = c.make_mask(T, window, blocks=images.blocks)
            else:
                masks[kind] = create_attention_mask(h, c, window_size=window)
        shared = {}  # gemma4: layer -> (keys, values, offset) for the KV-sharing layers after it
        for i in self.layers:
            layer, mask = model.layers[i], masks[self.layer_types[i]]
            c = cache[i - start] if i < self.num_cached_layers else None
            if self.model_type == "gemma3_text":
                h = layer(h, mask, c)
                continue
            kvs, offset = shared.get(model.previous_kvs[i], (None, None))
            h, kvs, offset = layer(h, mask, c, per_layer_input=None if P == 0 else per_layer[:, :, i],
                                   shared_kv=kvs, offset=offset)
            shared[i] = (kvs, offset)
        if last:
            return model.norm(h)
        out = h if P == 0 else mx.concatenate([h, per_layer.reshape(B, T, L * P).astype(h.dtype)], axis=-1)
        out = p.send(out)
        # Evaluating the cache (a prompt read in chunks) must run the send too, in order.
        cache[-1].keys = mx.depends(cache[-1].keys, out)
        return out

    @property
    def tied(self) -> bool:
        return getattr(self.lm, "tie_word_embeddings", True)

    @property
    def head(self) -> nn.Module:
        """The output head: the input embedding when tied."""
        return self.decoder.embed_tokens if self.tied else self.lm.lm_head

    @property
    def cpu_head(self) -> bool:
        """Whether the head runs through `products` (on the CPU, unquantized)."""
        return self.cpu_kernels and type(self.head) in (nn.Embedding, nn.Linear)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.pipeline is not None and not self.pipeline.last:
            # Never evaluated: rank 0 shares what it decides from its logits.
            return mx.zeros((*hidden.shape[:-1], self.vocab_size), mx.float32)
        head = self.head
        if self.cpu_head:
            out = product(hidden, head.weight)
        else:  # Metal, or a quantized head with its own kernel
            out = head.as_linear(hidden) if self.tied else head(hidden)
        if self.softcap:
            out = _softcap(out, self.softcap)
        return out

    def embed(self, tokens: mx.array) -> mx.array:
        """The target's input embedding as mlx-lm's model scales it: [B, T] -> [B, T, H]."""
        h = self.decoder.embed_tokens(tokens)
        return h * self.embed_scale

    def shared_kv(self, cache) -> dict:
        """kind -> (keys, values, first position): views of the target's cache arrays
        (empty on a pipeline rank without the drafter)."""
        if self.pipeline is not None and not self.pipeline.last:
            return {}
        return {kind: shared_kv_view(cache[i - self.layers.start]) for kind, i in self.shared_layer.items()}
