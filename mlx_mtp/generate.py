"""Public API: load a pair, then generate or stream_generate, exactly like the target alone.

    pair = mlx_mtp.load("target", "drafter")        # or load(alias)
    out = mlx_mtp.generate(pair, "Hello", max_tokens=64)
    for chunk in mlx_mtp.stream_generate(pair, "Hello"): print(chunk.text, end="")

A prompt cache (`make_prompt_cache(pair)`) carries a conversation across calls: each call
then passes only the new tokens and nothing is read twice.
"""

import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Union

import mlx.core as mx

from .cache import MAX_DRAFT_TOKENS
from .loading import LoadError, load_pair
from .proposers import HybridProposer, MTPProposer, NGramProposer
from .round import Sequence, prefill, run_round
from .sampling import SamplingParams
from .tuning import choose_k, load_or_measure


@dataclass
class Pair:
    target: object  # Target
    drafter: Optional[object]  # Drafter, or None for plain decoding
    tokenizer: Optional[object]  # mlx-lm TokenizerWrapper, or None (token-id prompts only)
    eos_ids: frozenset
    name: str = ""
    default_draft_tokens: int = 4

    costs: Optional[object] = field(default=None, repr=False)  # measured once, for auto K

    def draft_costs(self):
        """Measured target and drafter costs, for choosing K (once per pair)."""
        if self.costs is None:
            self.costs = load_or_measure(self, self.default_draft_tokens)
        return self.costs

    def __post_init__(self):
        # The drafter alone (`mtp`), and the default: n-gram lookup where the context
        # repeats itself, the drafter elsewhere. Without a drafter: the lookup alone.
        self.mtp = MTPProposer(self.drafter, self.target) if self.drafter else None
        self.proposer = HybridProposer(self.mtp) if self.mtp else NGramProposer()


@dataclass
class Throughput:
    """Committed tokens over wall time (of one generation, or of a whole batch)."""

    generation_tokens: int = 0
    generation_time: float = 0.0
    prompt_time: float = 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0


@dataclass
class Stats(Throughput):
    """Running statistics of one generation; the stream carries the same object."""

    prompt_tokens: int = 0
    drafts: List[List[int]] = field(default_factory=list)  # per round: proposed ids
    accepted: List[int] = field(default_factory=list)  # per round: how many were accepted
    sources: List[str] = field(default_factory=list)  # per round: who proposed

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def drafted_tokens(self) -> int:
        return sum(len(d) for d in self.drafts)

    @property
    def accepted_tokens(self) -> int:
        return sum(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per target verify forward (accepted drafts + 1)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def per_position_acceptance(self) -> List[float]:
        """Entry i: share of rounds that proposed > i tokens whose first i + 1 were accepted."""
        longest = max((len(d) for d in self.drafts), default=0)
        out = []
        for i in range(longest):
            rounds = [a for d, a in zip(self.drafts, self.accepted) if len(d) > i]
            out.append(sum(a > i for a in rounds) / len(rounds))
        return out

    @property
    def by_source(self) -> dict:
        """source -> {"rounds", "drafted", "accepted", "acceptance"}."""
        out = {}
        for d, a, s in zip(self.drafts, self.accepted, self.sources):
            if not d:
                continue
            e = out.setdefault(s, {"rounds": 0, "drafted": 0, "accepted": 0})
            e["rounds"] += 1
            e["drafted"] += len(d)
            e["accepted"] += a
        for e in out.values():
            e["acceptance"] = e["accepted"] / e["drafted"]
        return out

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @classmethod
    def pooled(cls, stats: List["Stats"]) -> "Stats":
        """One Stats over several generations: acceptance counted over all their rounds."""
        out = cls()
        for s in stats:
            out.prompt_tokens += s.prompt_tokens
            out.generation_tokens += s.generation_tokens
            out.prompt_time += s.prompt_time
            out.generation_time += s.generation_time
            out.drafts += s.drafts
            out.accepted += s.accepted
            out.sources += s.sources
        return out

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prompt_time": self.prompt_time,
            "generation_time": self.generation_time,
            "prompt_tps": self.prompt_tps,
            "generation_tps": self.generation_tps,
            "rounds": self.rounds,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_position_acceptance": self.per_position_acceptance,
            "by_source": self.by_source,
            "drafts": self.drafts,
            "accepted": self.accepted,
            "sources": self.sources,
        }


@dataclass
class GenerationResponse:
    """One streamed chunk: the text and ids committed since the previous chunk."""

    text: str
    tokens: List[int]
    stats: Stats
    finish_reason: Optional[str] = None  # "stop" (EOS), "length", or None while running


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]  # generated ids only (with the EOS that ended it, as mlx-lm yields it)
    stats: Stats
    finish_reason: Optional[str]


def load(target: str, drafter: Optional[str] = None) -> Pair:
    """Load a pair from paths or Hugging Face repo ids, or a models.toml alias."""
    from .registry import find_pair

    name, default_k = "", 4
    if drafter is None:
        entry = find_pair(target)
        if entry is not None:
            target, drafter = entry.target_path(), entry.drafter_path()
            name, default_k = entry.alias, entry.draft_tokens
    target_, drafter_, tokenizer, eos = load_pair(target, drafter)
    return Pair(target_, drafter_, tokenizer, frozenset(eos), name, default_k)


def make_prompt_cache(pair: Pair) -> Sequence:
    """A conversation state to pass to successive generate calls."""
    return Sequence(pair.target.make_cache())


def encode(pair: Pair, prompt: Union[str, List[int]], first: bool = True) -> List[int]:
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if not prompt:
        return []
    if pair.tokenizer is None:
        raise LoadError("this target has no tokenizer: pass the prompt as a list of token ids")
    tok = pair.tokenizer
    special = first and (tok.bos_token is None or not prompt.startswith(tok.bos_token))
    return tok.encode(prompt, add_special_tokens=special)


def check_lengths(pair: Pair, max_tokens: int, num_draft_tokens: Optional[int]) -> int:
    """The most drafts per round, after checking both lengths."""
    k = pair.default_draft_tokens if num_draft_tokens is None else num_draft_tokens
    if not 0 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {k}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return k


def start(pair: Pair, seed: Optional[int]):
    """Seed the random stream and give the proposer a fresh start."""
    if seed is not None:
        mx.random.seed(seed)
    if hasattr(pair.proposer, "reset"):
        pair.proposer.reset()


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
    prompt_cache: Optional[Sequence] = None,
) -> Iterator[GenerationResponse]:
    """Yield committed text round by round; the last chunk has a finish_reason.

    num_draft_tokens: K drafts every round (0: plain decoding), or None to choose K each
    round from the pair's measured costs and the live acceptance, up to its default.
    """
    params = SamplingParams(temperature, top_p, top_k, min_p)
    auto = num_draft_tokens is None  # choose K per round, up to the pair's default
    k = check_lengths(pair, max_tokens, num_draft_tokens)
    seq = prompt_cache if prompt_cache is not None else make_prompt_cache(pair)
    tokens = encode(pair, prompt, first=not seq.tokens)
    if not tokens:
        raise ValueError("the prompt is empty")
    context = pair.target.max_positions
    if context and len(seq.tokens) + len(tokens) >= context:
        raise ValueError(
            f"the prompt needs {len(seq.tokens) + len(tokens)} positions but the target's context is {context}"
        )
    if context:
        max_tokens = min(max_tokens, context - len(seq.tokens) - len(tokens))
    start(pair, seed)

    stats = Stats(prompt_tokens=len(tokens))
    detokenizer = pair.tokenizer.detokenizer if pair.tokenizer else None
    if detokenizer is not None:
        detokenizer.reset()

    def chunk(new: List[int], finish: Optional[str]) -> GenerationResponse:
        text = ""
        if detokenizer is not None:
            for t in new:
                if t not in pair.eos_ids:
                    detokenizer.add_token(t)
            if finish:
                detokenizer.finalize()
            text = detokenizer.last_segment
        return GenerationResponse(text, new, stats, finish)

    costs = pair.draft_costs() if auto and k > 0 else None
    tic = time.perf_counter()
    first = prefill(pair.target, seq, tokens, params)
    stats.prompt_time = time.perf_counter() - tic
    stats.generation_tokens = 1
    tic = time.perf_counter()
    new = [first]
    while True:
        finish = "stop" if new[-1] in pair.eos_ids else "length" if stats.generation_tokens >= max_tokens else None
        stats.generation_time = time.perf_counter() - tic
        yield chunk(new, finish)
        if finish:
            return
        limit = max_tokens - stats.generation_tokens
        k_round = choose_k(costs, stats, k, pair.proposer.next_source(seq.tokens)) if costs else k
        result = run_round(pair.target, pair.proposer, seq, min(k_round, limit - 1), params, limit, pair.eos_ids)
        stats.drafts.append(result.drafted)
        stats.accepted.append(result.accepted)
        stats.sources.append(result.source)
        stats.generation_tokens += len(result.committed)
        new = result.committed


def generate(pair: Pair, prompt: Union[str, List[int]], **kwargs) -> GenerationResult:
    """Run `stream_generate` to the end; same keyword arguments."""
    text, tokens = [], []
    for response in stream_generate(pair, prompt, **kwargs):
        text.append(response.text)
        tokens += response.tokens
    return GenerationResult("".join(text), tokens, response.stats, response.finish_reason)
