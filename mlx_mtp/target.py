"""Adapter over an mlx-lm Gemma model (gemma4, gemma4_text, gemma3_text) as a verifier.

One forward gives the post-final-norm hidden states and, only where asked, the logits. The
adapter owns the caches (rollback-capable, see cache.py) and exposes the KV arrays of the
last non-shared sliding and full layers: the arrays an MTP drafter cross-attends to.
"""

import copy
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from .cache import BatchCache, shared_kv_view

SLIDING, FULL = "sliding_attention", "full_attention"


@partial(mx.compile, shapeless=True)
def _softcap(x, cap):
    return mx.tanh(x / cap) * cap


def column_product(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T computed as (weight @ x.T).T: [..., in] x [out, in] -> [..., out].

    On the CPU the BLAS path taken for x @ W.T with 3 or more rows of x re-packs W, so a
    forward over K + 1 tokens costs up to twice a forward over one; weight @ x.T reads W
    once for any few rows (README, "Fast CPU path"). Same products, summed in another
    order: results may differ in the last bit, like any change of kernel.
    """
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    return (weight @ rows.T).T.reshape(*x.shape[:-1], weight.shape[0])


class ColumnLinear(nn.Linear):
    """nn.Linear through `column_product`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = column_product(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


def with_column_linears(module: nn.Module) -> nn.Module:
    """A copy of `module` whose unquantized linear layers are ColumnLinear; the copy shares
    every array with the original, which stays unchanged (plain mlx-lm keeps its forward)."""
    if not isinstance(module, nn.Module):  # e.g. a list of layer indices
        return module
    out = copy.copy(module)
    if type(module) is nn.Linear:
        out.__class__ = ColumnLinear
        return out
    for name in module.children():
        out[name] = tree_map(with_column_linears, module[name], is_leaf=lambda m: isinstance(m, nn.Module))
    return out


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class Target:
    def __init__(self, model: nn.Module):
        self.model = model
        self.lm = getattr(model, "language_model", model)  # gemma4 wraps its text model
        # Measured on the CPU only; with Metal, mlx-lm's own layers run unchanged.
        self.column_major = on_cpu()
        self.decoder = with_column_linears(self.lm.model) if self.column_major else self.lm.model
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
        tied = getattr(self.lm, "tie_word_embeddings", True)
        head = self.decoder.embed_tokens if tied else self.lm.lm_head
        if self.column_major and type(head) in (nn.Embedding, nn.Linear):
            out = column_product(hidden, head.weight)
        else:  # Metal, or a quantized head with its own kernel
            out = head.as_linear(hidden) if tied else head(hidden)
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
