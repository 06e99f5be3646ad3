"""mlx-mtp: exact speculative decoding with multi-token-prediction drafters on MLX."""

from .blas import preload_mkl

preload_mkl()  # before anything imports mlx: MKL only takes over MLX's BLAS if loaded first

from .generate import (
    GenerationResponse,
    GenerationResult,
    Pair,
    Stats,
    generate,
    load,
    make_prompt_cache,
    stream_generate,
)
from .batch import batch_generate
from .loading import LoadError

__all__ = [
    "GenerationResponse",
    "GenerationResult",
    "LoadError",
    "Pair",
    "Stats",
    "batch_generate",
    "generate",
    "load",
    "make_prompt_cache",
    "stream_generate",
]
