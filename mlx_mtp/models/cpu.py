"""The target's forward on the CPU: the same arithmetic as mlx-lm's modules, in kernels
that suit a CPU (README, "Fast CPU path").

- Linear layers and the head compute x @ W.T the way measured fastest on this machine
  for that weight shape and number of rows (`products`): which orientation a BLAS runs
  fastest for a few rows differs between CPUs, and a forward over K + 1 tokens could cost
  twice a forward over one in the wrong one.
- Norms and RoPE run compiled: on the CPU `mx.fast.rms_norm` and `mx.fast.rope` are
  compositions of several small ops, each paying a dispatch of a few microseconds, about
  six norms and two ropes per layer; compiled, their elementwise parts fuse. The results
  are the same bits (tested).

`for_cpu` returns a copy of a module tree with these swaps that shares every array with
the original, which stays unchanged: plain mlx-lm keeps its own forward.
"""

import copy
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models import gemma3_text, gemma4_text

from .cache import MAX_DRAFT_TOKENS
from .products import product


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class MeasuredLinear(nn.Linear):
    """nn.Linear through `products.product`."""

    def __call__(self, x: mx.array) -> mx.array:
        y = product(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


@partial(mx.compile, shapeless=True)
def _rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, weight, eps)


@partial(mx.compile, shapeless=True)
def _one_plus_rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, 1.0 + weight, eps)


@mx.compile  # traced once per shape: rope's composition slices by shape
def _rope(x, offset, dims, traditional, base, scale):
    return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)


class CompiledRMSNorm(nn.RMSNorm):
    def __call__(self, x):
        return _rms_norm(x, self["weight"], self.eps)


class CompiledGemma3RMSNorm(gemma3_text.RMSNorm):  # scales by 1 + weight
    def __call__(self, x):
        return _one_plus_rms_norm(x, self.weight, self.eps)


class CompiledRMSNormNoScale(gemma4_text.RMSNormNoScale):
    def __call__(self, x):
        return _rms_norm(x, None, self.eps)


class CompiledRoPE(nn.RoPE):
    def __call__(self, x, offset=0):
        if x.shape[-2] > MAX_DRAFT_TOKENS + 1:  # a prompt chunk: dispatch costs nothing there,
            return super().__call__(x, offset)  # and every length would keep its own trace
        # An array offset: one trace for every position.
        return _rope(x, mx.array(offset), self.dims, self.traditional, self.base, self.scale)


COMPILED = {
    nn.RMSNorm: CompiledRMSNorm,
    gemma3_text.RMSNorm: CompiledGemma3RMSNorm,
    gemma4_text.RMSNormNoScale: CompiledRMSNormNoScale,
    nn.RoPE: CompiledRoPE,
}


def for_cpu(module):
    """A copy of `module` with the swaps above; every array is shared with `module`."""
    if not isinstance(module, nn.Module):  # e.g. a list of layer indices
        return module
    out = copy.copy(module)
    if type(module) is nn.Linear:
        out.__class__ = MeasuredLinear
        return out
    if type(module) in COMPILED:
        out.__class__ = COMPILED[type(module)]
    for name in module.children():
        out[name] = tree_map(for_cpu, module[name], is_leaf=lambda m: isinstance(m, nn.Module))
    return out
