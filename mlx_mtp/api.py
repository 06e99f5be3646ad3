"""Public API: load a pair, then generate or stream_generate, exactly like the target alone.

    pair = mlx_mtp.load("target", "drafter")        # or load(alias)
    out = mlx_mtp.generate(pair, "Hello", max_tokens=64)
    for chunk in mlx_mtp.stream_generate(pair, "Hello"): print(chunk.text, end="")

A prompt cache (`make_prompt_cache(pair)`) carries a conversation across calls: each call
then passes only the new tokens and nothing is read twice. The keyword arguments are
mlx-lm's; each call turns them into one `GenerationRequest` for the engine.
"""

import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .checkpoints.pair import Pair, load_pair
from .decoding.proposers import Proposer
from .decoding.sampling import SamplingParams
from .engine.rows import PromptCache
from .engine.scheduler import Engine
from .engine.stats import BatchStats, Stats
from .images import Image, ImageError, check_count
from .request import GenerationRequest, encode

Prompt = Union[str, List[int]]
ImageSource = Union[str, Path, bytes, Image]  # a file, its bytes, or an image prepared already

# Prompt ids a generation here reads per forward, as mlx-lm's generate: nothing decodes
# beside it, so the fewest forwards win. (The server's engine reads smaller measured
# chunks, so that the rows decoding beside a long prompt go on.)
PREFILL_STEP_SIZE = 2048


@dataclass
class GenerationResponse:
    """One streamed chunk: the text and ids committed since the previous chunk."""

    text: str
    tokens: List[int]
    stats: Stats
    # "stop" (EOS), "length", "context", "interrupted", "error" (the grammar engine failed; see
    # `stream_generate`), or None while running
    finish_reason: Optional[str] = None
    # with a request's `logprobs`: per id, (its log-prob, [(id, log-prob)] of the top ones)
    logprobs: Optional[list] = None
    # in the first chunk, with a request's `prompt_logprobs`: the same per prompt id (the
    # first id of a new conversation has none)
    prompt_logprobs: Optional[list] = None


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]  # generated ids only (with the EOS that ended it, as mlx-lm yields it)
    stats: Stats
    finish_reason: Optional[str]


def load(target: str, drafter: Optional[str] = None) -> Pair:
    """Load a pair from paths or Hugging Face repo ids, or a models.toml alias."""
    return load_pair(target, drafter)


def make_prompt_cache(pair: Pair) -> PromptCache:
    """A conversation state to pass to successive generate calls."""
    return PromptCache()


def make_request(
    pair: Pair,
    prompt: Prompt,
    first: bool = True,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    num_draft_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    logits_processors: Optional[List[Callable]] = None,
    stop: Sequence[str] = (),
) -> GenerationRequest:
    """mlx-lm's keyword arguments as one request (`first`: a conversation's first turn,
    which gets BOS)."""
    params = SamplingParams(temperature, top_p, top_k, min_p, logits_processors)
    return GenerationRequest(encode(pair.tokenizer, prompt, first), params, max_tokens, seed, num_draft_tokens, stop)


def _request(pair: Pair, prompt: Prompt, first: bool, request: Optional[GenerationRequest], kwargs: dict):
    """The request of one call: from keyword settings, or a given request's settings."""
    if request is None:
        return make_request(pair, prompt, first, **kwargs)
    if not isinstance(request, GenerationRequest):
        raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}")
    if kwargs:
        raise ValueError(f"give the settings as a request or as keywords, not both (got {', '.join(kwargs)})")
    return request.with_prompt(encode(pair.tokenizer, prompt, first))


def prepare_images(pair: Pair, images: Sequence[ImageSource]) -> Tuple[Image, ...]:
    """Images (paths, bytes, or `Image`s already prepared) checked and resized for this
    pair's target; ImageError (a ValueError) for one it cannot take."""
    if isinstance(images, (str, bytes, Path, Image)):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise ImageError(f"images must be a list of paths, bytes or Images, got {type(images).__name__}")
    vision = pair.target.vision
    check_count(len(images), vision, pair.name or "this target")
    return tuple(image if isinstance(image, Image) else vision.prepare(image) for image in images)


def with_images(pair: Pair, request: GenerationRequest, images: Sequence[ImageSource]) -> GenerationRequest:
    """The request with these images placed in its prompt: at its image tokens (the chat
    template writes one per image), or, if it has none, before the rest of the prompt
    (after BOS)."""
    images = prepare_images(pair, images)
    if not images:
        return request
    vision = pair.target.vision
    ids = list(request.prompt)
    if vision.image_token not in ids:
        at = 1 if ids[:1] == [getattr(pair.tokenizer, "bos_token_id", None)] else 0
        ids[at:at] = [vision.image_token] * len(images)
    return replace(request, prompt=tuple(vision.placed(ids, images)), images=images)


def stream_generate(
    pair: Pair,
    prompt: Prompt,
    prompt_cache: Optional[PromptCache] = None,
    interrupt: Optional[threading.Event] = None,
    proposer: Union[str, Proposer] = "hybrid",
    request: Optional[GenerationRequest] = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    images: Sequence[ImageSource] = (),
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield committed text round by round; the last chunk has a finish_reason ("stop": a
    stop id or stop string, "length": max_tokens, "context": the end of the target's context,
    "error": the request's grammar engine failed on an allowed id, e.g. at one of
    llguidance's limits on an ambiguous grammar, and a warning says why; the text does not
    complete the grammar).

    max_tokens: -1 for no limit (until a stop id or the end of the context), as in mlx-lm.
    temperature, top_p, top_k, min_p, logits_processors: as mlx-lm's `make_sampler` and
    `logits_processors` (see `SamplingParams`).
    num_draft_tokens: K drafts every round (0: plain decoding), or None to choose K each
    round from the pair's measured costs and the live acceptance, up to its default.
    seed: this generation's own random key (None: drawn from MLX's global stream).
    stop: strings that end the generation (not part of its text).
    proposer: who drafts, "hybrid" (default), "mtp" (the drafter alone) or "ngram".
    Stopping early (closing the generator, Ctrl-C, an exception) keeps what was committed
    in `prompt_cache`. interrupt: an event that, once set, ends the generation after the
    round under way (finish_reason "interrupted"); in a pipeline, the way to stop early.
    request: a `GenerationRequest` whose settings to use instead of the keywords (its
    prompt is replaced by `prompt`).
    prefill_step_size: prompt ids read per forward (default: mlx-lm's 2048); the output of a
    prompt longer than it depends on it, as in mlx-lm.
    images: image files, their bytes, or prepared `Image`s, for a multimodal target (see
    `with_images` for where they go in the prompt).
    """
    request = _request(pair, prompt, prompt_cache is None or not prompt_cache.tokens, request, kwargs)
    request = with_images(pair, request, images)
    engine = Engine(pair, max_batch=1, proposer=proposer, prefill_step_size=prefill_step_size)
    if interrupt is not None:
        if not callable(getattr(interrupt, "is_set", None)):
            raise ValueError(f"interrupt must be a threading.Event, got {type(interrupt).__name__}")
        engine.interrupt = interrupt
    row = engine.add(request, prompt_cache)
    try:
        while engine.busy:
            for update in engine.step():
                if update.finish_reason == "error":
                    warnings.warn(f"the grammar engine stopped the generation: {row.error}", stacklevel=2)
                yield GenerationResponse(update.text, update.tokens, row.stats, update.finish_reason, update.logprobs,
                                         update.prompt_logprobs)
    finally:
        engine.remove(row)


def generate(pair: Pair, prompt: Prompt, **kwargs) -> GenerationResult:
    """Run `stream_generate` to the end; same keyword arguments."""
    text, tokens = [], []
    for response in stream_generate(pair, prompt, **kwargs):
        text.append(response.text)
        tokens += response.tokens
    return GenerationResult("".join(text), tokens, response.stats, response.finish_reason)


class BatchResults(list):
    """One `GenerationResult` per prompt, in order, plus `stats` for the batch."""

    def __init__(self, results, stats: BatchStats):
        super().__init__(results)
        self.stats = stats


def batch_generate(
    pair: Pair,
    prompts: List[Prompt],
    seed: Union[None, int, List[Optional[int]]] = None,
    prompt_caches: Optional[List[Optional[PromptCache]]] = None,
    max_batch: Optional[int] = None,
    proposer: Union[str, Proposer] = "hybrid",
    request: Optional[GenerationRequest] = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    images: Optional[List[Sequence[ImageSource]]] = None,
    **kwargs,
) -> BatchResults:
    """Generate for every prompt; row i gives what `generate` gives for prompt i alone.

    Same settings as `generate`, for every row. seed: one per row, or an int s (row i is
    seeded s + i); at a fixed num_draft_tokens, row i equals `generate(prompt_i,
    seed=s_i)`. prompt_caches: per row a conversation to continue (or None). max_batch:
    rows decoded at once (default: all); the others join as rows finish. images: per row, its
    images (as `generate`'s).
    """
    if not prompts:
        raise ValueError("no prompts given")
    seeds = seed if isinstance(seed, (list, tuple)) else [None if seed is None else seed + i for i in range(len(prompts))]
    caches = prompt_caches or [None] * len(prompts)
    images = images or [()] * len(prompts)
    if len(seeds) != len(prompts) or len(caches) != len(prompts) or len(images) != len(prompts):
        raise ValueError("seed, prompt_caches and images need one entry per prompt")
    requests = []
    for prompt, s, cache, row_images in zip(prompts, seeds, caches, images):
        first = cache is None or not cache.tokens
        if request is None:
            one = make_request(pair, prompt, first, seed=s, **kwargs)
        else:
            one = _request(pair, prompt, first, request, kwargs)
            one = one if s is None else replace(one, seed=s)
        requests.append(with_images(pair, one, row_images))
    engine = Engine(pair, max_batch=len(prompts) if max_batch is None else max_batch, proposer=proposer,
                    prefill_step_size=prefill_step_size)
    rows = []
    try:
        for request, cache in zip(requests, caches):
            rows.append(engine.add(request, cache))
        text = {id(row): [] for row in rows}
        while engine.busy:
            for update in engine.step():
                text[id(update.row)].append(update.text)
    finally:
        for row in rows:
            engine.remove(row)
    results = [GenerationResult("".join(text[id(r)]), r.generated, r.stats, r.finish_reason) for r in rows]
    return BatchResults(results, engine.stats)
