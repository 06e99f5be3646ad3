"""mlx-mtp: exact speculative decoding with multi-token-prediction drafters on MLX."""

from .models.blas import preload_mkl

preload_mkl()  # before anything imports mlx: MKL only takes over MLX's BLAS if loaded first

from .api import (
    BatchResults,
    GenerationResponse,
    GenerationResult,
    batch_generate,
    generate,
    load,
    make_prompt_cache,
    prepare_images,
    stream_generate,
)
from .checkpoints.loading import LoadError
from .checkpoints.pair import Pair
from .decoding.sampling import SamplingParams
from .engine.rows import PromptCache, Update
from .engine.scheduler import Engine
from .engine.stats import BatchStats, Stats
from .images import Image, ImageError
from .request import GenerationRequest

__all__ = [
    "BatchResults",
    "BatchStats",
    "Engine",
    "GenerationRequest",
    "GenerationResponse",
    "GenerationResult",
    "Image",
    "ImageError",
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
    "prepare_images",
    "stream_generate",
]
