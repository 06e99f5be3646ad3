"""Adapter over an mlx-lm Gemma model (gemma4, gemma4_text, gemma3_text) as a verifier.

One forward gives the post-final-norm hidden states and, only where asked, the logits. The
adapter owns the caches (rollback-capable, see cache.py) and exposes the KV arrays of the
last non-shared sliding and full layers: the arrays an MTP drafter cross-attends to.
"""

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .cache import BatchCache, shared_kv_view

SLIDING, FULL = "sliding_attention", "full_attention"


@partial(mx.compile, shapeless=True)
def _softcap(x, cap):
    return mx.tanh(x / cap) * cap


class Target:
    def __init__(self, model: nn.Module):
        self.model = model
        self.lm = getattr(model, "language_model", model)  # gemma4 wraps its text model
        self.decoder = self.lm.model
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
        if self.model_type == "gemma3_text":
            # mlx-lm's gemma3 scales embeddings by sqrt(hidden) rounded to bfloat16.
            self.embed_scale = mx.array(self.hidden_size**0.5, mx.bfloat16).astype(mx.float32)
        else:
            self.embed_scale = mx.array(self.hidden_size**0.5, mx.float32)
        self.softcap = getattr(self.lm, "final_logit_softcapping", None)

    @property
    def dtype(self):
        # The norm is never quantized: the dtype activations and KV arrays have.
        return self.decoder.norm.weight.dtype

    def make_cache(self, rows: int = 1):
        return [
            BatchCache(rows, self.sliding_window if kind == SLIDING else None)
            for kind in self.layer_types[: self.num_cached_layers]
        ]

    def hidden(self, tokens: mx.array, cache) -> mx.array:
        """[B, T] new tokens -> [B, T, H] post-norm hidden states; extends the cache."""
        return self.decoder(tokens, cache=cache)

    def logits(self, hidden: mx.array) -> mx.array:
        if getattr(self.lm, "tie_word_embeddings", True):
            out = self.decoder.embed_tokens.as_linear(hidden)
        else:
            out = self.lm.lm_head(hidden)
        if self.softcap:
            out = _softcap(out, self.softcap)
        return out

    def embed(self, tokens: mx.array) -> mx.array:
        """The target's input embedding as the target scales it: [B, T] -> [B, T, H]."""
        h = self.decoder.embed_tokens(tokens)
        return h * self.embed_scale.astype(h.dtype)

    def shared_kv(self, cache) -> dict:
        """kind -> (keys, values, first position): views of the target's cache arrays."""
        return {kind: shared_kv_view(cache[i]) for kind, i in self.shared_layer.items()}
