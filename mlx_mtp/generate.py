"""Public API: load a pair, then generate or stream_generate, exactly like the target alone.

    pair = mlx_mtp.load("target", "drafter")        # or load(alias)
    out = mlx_mtp.generate(pair, "Hello", max_tokens=64)
    for chunk in mlx_mtp.stream_generate(pair, "Hello"): print(chunk.text, end="")

A prompt cache (`make_prompt_cache(pair)`) carries a conversation across calls: each call
then passes only the new tokens and nothing is read twice.
"""

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Union

from . import pipeline
from .engine import Engine, PromptCache
from .loading import LoadError, load_pair
from .proposers import DraftsFromRankZero, HybridProposer, MTPProposer, NGramProposer
from .sampling import SamplingParams
from .stats import BatchStats, Stats
from .tuning import Costs, RoundTimes, interpolate_costs, load_or_measure

PROPOSERS = ("hybrid", "mtp", "ngram")


@dataclass
class Pair:
    target: object  # Target
    drafter: Optional[object]  # Drafter, or None for plain decoding
    tokenizer: Optional[object]  # mlx-lm TokenizerWrapper, or None (token-id prompts only)
    eos_ids: frozenset
    name: str = ""
    default_draft_tokens: int = 4
    chat: str = "template"  # how to chat with the target: "template" or "dialogue" (a base model)
    label: str = ""  # what the model is, for chat's banner
    drafter_on_rank_0: bool = False  # a pipeline rank without the drafter, which rank 0 has
    distributed: Optional[dict] = None  # in a pipeline: world size, each rank's layers and weight bytes

    costs: dict = field(default_factory=dict, repr=False)  # rows (a power of two) -> Costs, for auto K
    stale_costs: set = field(default_factory=set, repr=False)  # row counts to measure again
    round_times: RoundTimes = field(default_factory=RoundTimes, repr=False)

    def draft_costs(self, rows: int = 1) -> Costs:
        """Costs of target forwards over `rows` rows and of drafter steps, for choosing K:
        measured once per pair at powers of two, interpolated between them."""

        def measured(b: int) -> Costs:
            if b not in self.costs:
                self.costs[b] = load_or_measure(self, self.default_draft_tokens, b, b in self.stale_costs)
                self.stale_costs.discard(b)
            return self.costs[b]

        return interpolate_costs(measured, rows)

    def observe_round(self, costs: Costs, k: int, drafter: bool, seconds: float):
        """A round whose K was chosen from `costs` drafted k tokens (with drafter steps or
        not) and took `seconds`: when recent rounds disagree with the costs, they are marked
        to be measured again by `remeasure_stale_costs`."""
        if k >= len(costs.target) or self.target.pipeline is not None:
            # (a row's fixed K past what was measured; or a pipeline: ranks would have to
            # agree on each round's time, one more exchange per round)
            return
        if self.round_times.disagree(seconds, costs.target[k] + drafter * k * costs.draft_step):
            self.stale_costs |= set(self.costs)

    def remeasure_stale_costs(self):
        """Measure again the costs that live rounds disagreed with. A measurement takes a
        few dozen forwards, so the engine calls this only when no row of it is streaming
        (before first tokens), never between two tokens of a stream; until then the old
        costs serve."""
        for b in sorted(self.stale_costs):
            self.costs.pop(b, None)
            self.draft_costs(b)

    def __post_init__(self):
        self.mtp = None
        if self.drafter is not None:
            self.mtp = MTPProposer(self.drafter, self.target)
        elif self.drafter_on_rank_0:
            self.mtp = DraftsFromRankZero(self.target.vocab_size)
        self.use_proposer("hybrid")

    def use_proposer(self, name: str):
        """Who drafts from now on: "hybrid" (the default: the n-gram lookup where the context
        repeats itself, the drafter elsewhere; the lookup alone without a drafter), "mtp"
        (the drafter alone) or "ngram" (the lookup alone)."""
        if name not in PROPOSERS:
            raise ValueError(f"unknown proposer {name!r} (known: {', '.join(PROPOSERS)})")
        if name == "mtp" and self.mtp is None:
            raise ValueError("the proposer 'mtp' needs a drafter, and this pair has none")
        if name == "hybrid" and self.mtp is not None:
            self.proposer = HybridProposer(self.mtp)
        else:
            self.proposer = self.mtp if name == "mtp" else NGramProposer()


@dataclass
class GenerationResponse:
    """One streamed chunk: the text and ids committed since the previous chunk."""

    text: str
    tokens: List[int]
    stats: Stats
    finish_reason: Optional[str] = None  # "stop" (EOS), "length", "context", "interrupted", or None while running


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]  # generated ids only (with the EOS that ended it, as mlx-lm yields it)
    stats: Stats
    finish_reason: Optional[str]


def load(target: str, drafter: Optional[str] = None) -> Pair:
    """Load a pair from paths or Hugging Face repo ids, or a models.toml alias."""
    from .registry import DIALOGUE, TEMPLATE, find_pair

    name, default_k, chat, label = "", 4, "", ""
    if drafter is None:
        entry = find_pair(target)
        if entry is not None:
            target, drafter = entry.target_path(), entry.drafter_path()
            name, default_k, chat, label = entry.alias, entry.draft_tokens, entry.chat, entry.label
    # Under `mlx.launch`: this rank's share of a pipeline-sharded target.
    group = pipeline.init()
    target_, drafter_, tokenizer, eos = load_pair(target, drafter, group)
    if not chat:  # a checkpoint without a chat template is taken for a base model
        chat = TEMPLATE if tokenizer is not None and tokenizer.has_chat_template else DIALOGUE
    elsewhere = drafter is not None and drafter_ is None
    layout = pipeline.describe(group, target_.weight_bytes) if group is not None else None
    return Pair(target_, drafter_, tokenizer, frozenset(eos), name, default_k, chat, label, elsewhere, layout)


def make_prompt_cache(pair: Pair) -> PromptCache:
    """A conversation state to pass to successive generate calls."""
    return PromptCache()


def encode(pair: Pair, prompt: Union[str, List[int]], first: bool = True) -> List[int]:
    """Token ids of a prompt; strings get BOS only on a conversation's first turn."""
    if not isinstance(prompt, str):
        return list(prompt)  # checked against the vocabulary by the engine
    if not prompt:
        return []
    if pair.tokenizer is None:
        raise LoadError("this target has no tokenizer: pass the prompt as a list of token ids")
    tok = pair.tokenizer
    special = first and (tok.bos_token is None or not prompt.startswith(tok.bos_token))
    return tok.encode(prompt, add_special_tokens=special)


def stream_generate(
    pair: Pair,
    prompt: Union[str, List[int]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    num_draft_tokens: Optional[int] = None,
    seed: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    logits_processors: Optional[List[Callable]] = None,
    interrupt: Optional[threading.Event] = None,
) -> Iterator[GenerationResponse]:
    """Yield committed text round by round; the last chunk has a finish_reason ("stop": a
    stop id, "length": max_tokens, "context": the end of the target's context).

    max_tokens: -1 for no limit (until a stop id or the end of the context), as in mlx-lm.
    temperature, top_p, top_k, min_p, logits_processors: as mlx-lm's `make_sampler` and
    `logits_processors` (see `SamplingParams`).
    num_draft_tokens: K drafts every round (0: plain decoding), or None to choose K each
    round from the pair's measured costs and the live acceptance, up to its default.
    seed: this generation's own random key (None: drawn from MLX's global stream).
    Stopping early (closing the generator, Ctrl-C, an exception) keeps what was committed
    in `prompt_cache`. interrupt: an event that, once set, ends the generation after the
    round under way (finish_reason "interrupted"); in a pipeline, the way to stop early.
    """
    params = SamplingParams(temperature, top_p, top_k, min_p, logits_processors)
    first = prompt_cache is None or not prompt_cache.tokens
    engine = Engine(pair, max_batch=1)
    if interrupt is not None:
        if not callable(getattr(interrupt, "is_set", None)):
            raise ValueError(f"interrupt must be a threading.Event, got {type(interrupt).__name__}")
        engine.interrupt = interrupt
    row = engine.add(encode(pair, prompt, first), params, max_tokens, seed, num_draft_tokens, prompt_cache=prompt_cache)
    try:
        while engine.busy:
            for update in engine.step():
                yield GenerationResponse(update.text, update.tokens, row.stats, update.finish_reason)
    finally:
        engine.remove(row)


def generate(pair: Pair, prompt: Union[str, List[int]], **kwargs) -> GenerationResult:
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
    prompts: List[Union[str, List[int]]],
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    num_draft_tokens: Optional[int] = None,
    seed: Union[None, int, List[Optional[int]]] = None,
    prompt_caches: Optional[List[Optional[PromptCache]]] = None,
    max_batch: Optional[int] = None,
    logits_processors: Optional[List[Callable]] = None,
) -> BatchResults:
    """Generate for every prompt; row i gives what `generate` gives for prompt i alone.

    Same settings as `generate`, for every row. seed: one per row, or an int s (row i is
    seeded s + i); at a fixed num_draft_tokens, row i equals `generate(prompt_i,
    seed=s_i)`. prompt_caches: per row a conversation to continue (or None). max_batch:
    rows decoded at once (default: all); the others join as rows finish.
    """
    if not prompts:
        raise ValueError("no prompts given")
    params = SamplingParams(temperature, top_p, top_k, min_p, logits_processors)
    seeds = seed if isinstance(seed, (list, tuple)) else [None if seed is None else seed + i for i in range(len(prompts))]
    caches = prompt_caches or [None] * len(prompts)
    if len(seeds) != len(prompts) or len(caches) != len(prompts):
        raise ValueError("seed and prompt_caches need one entry per prompt")
    engine = Engine(pair, max_batch=len(prompts) if max_batch is None else max_batch)
    rows = []
    try:
        for prompt, s, cache in zip(prompts, seeds, caches):
            ids = encode(pair, prompt, first=cache is None or not cache.tokens)
            rows.append(engine.add(ids, params, max_tokens, s, num_draft_tokens, prompt_cache=cache))
        text = {id(row): [] for row in rows}
        while engine.busy:
            for update in engine.step():
                text[id(update.row)].append(update.text)
    finally:
        for row in rows:
            engine.remove(row)
    results = [GenerationResult("".join(text[id(r)]), r.generated, r.stats, r.finish_reason) for r in rows]
    return BatchResults(results, engine.stats)
