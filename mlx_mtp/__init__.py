"""mlx-mtp: exact speculative decoding with multi-token-prediction drafters on MLX."""

from .blas import preload_mkl

preload_mkl()  # before anything imports mlx: MKL only takes over MLX's BLAS if loaded first

from .engine import Engine, PromptCache, Update
from .generate import (
    BatchResults,
    GenerationResponse,
    GenerationResult,
    Pair,
    batch_generate,
    generate,
    load,
    make_prompt_cache,
    stream_generate,
)
from .loading import LoadError
from .sampling import SamplingParams
from .stats import BatchStats, Stats

__all__ = [
    "BatchResults",
    "BatchStats",
    "Engine",
    "GenerationResponse",
    "GenerationResult",
    "LoadError",
    "Pair",
    "PromptCache",
    "SamplingParams",
    "Stats",
    "Update",
    "batch_generate",
    "generate",
    "load",
    "make_prompt_cache",
    "stream_generate",
]
