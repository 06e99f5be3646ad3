"""What one generation asks for, checked once where it is built, and how its text comes out.

A `GenerationRequest` is the only thing the engine takes: the CLI, the server and the
public functions each build one from their own inputs (flags, a JSON body, keyword
arguments). Its own fields are checked by its constructor; what only a loaded model knows
(the vocabulary, the context) the engine checks when the request joins.
"""

from dataclasses import dataclass, replace
from numbers import Integral
from typing import List, Optional, Sequence, Tuple, Union

from .checkpoints.loading import LoadError
from .decoding.sampling import SamplingParams
from .images import Image
from .models.cache import MAX_DRAFT_TOKENS

NO_LIMIT = -1  # max_tokens as in mlx-lm: until a stop id or the end of the context


def is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


MAX_TOP_LOGPROBS = 20  # as OpenAI


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the ids to read (after a prompt cache's conversation, if any) and
    everything that decides what follows them.

    max_tokens: most tokens to generate, or -1 (NO_LIMIT): until a stop id or the end of
    the target's context. seed: the row's own random key (None: drawn from MLX's global
    stream). draft_tokens: K every round (0: plain decoding), or None to choose K each
    round from measured costs and the live acceptance. stop: text that ends the
    generation and is not part of it. stop_ids: ids that end it (None: the pair's EOS).
    logprobs: report each committed token's log-probability under the target (its raw
    distribution, from the forward that verified it) with this many top alternatives, 0-20
    (None: none). prompt_logprobs: with logprobs, also each prompt id's, under the ids
    before it (the first id of a new conversation has none), as OpenAI's `echo` scores a
    prompt. grammar: an llguidance grammar (see `decoding.grammar.json_grammar`) that every
    committed id must follow (None: free text). images: the prompt's images, in order (see
    `images.Vision.placed`, which puts their soft tokens in the prompt)."""

    prompt: Tuple[int, ...] = ()
    params: SamplingParams = SamplingParams()
    max_tokens: int = 256
    seed: Optional[int] = None
    draft_tokens: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stop_ids: Optional[frozenset] = None
    logprobs: Optional[int] = None
    prompt_logprobs: bool = False
    grammar: Optional[str] = None
    images: Tuple[Image, ...] = ()

    def __post_init__(self):
        if isinstance(self.prompt, (str, bytes)):
            raise ValueError("the prompt must be token ids here (encode text first)")
        object.__setattr__(self, "prompt", tuple(token_ids(self.prompt)))
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(self.params).__name__}")
        if not is_int(self.max_tokens) or not (self.max_tokens >= 1 or self.max_tokens == NO_LIMIT):
            raise ValueError(f"max_tokens must be an integer >= 1, or -1 for no limit, got {self.max_tokens!r}")
        if self.draft_tokens is not None and not (is_int(self.draft_tokens) and 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS):
            raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {self.draft_tokens!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in 0..2**64 - 1, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop or ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.stop_ids is not None:
            object.__setattr__(self, "stop_ids", frozenset(token_ids(self.stop_ids)))
        if self.logprobs is not None and not (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS} top alternatives, got {self.logprobs!r}")
        if not isinstance(self.prompt_logprobs, bool) or (self.prompt_logprobs and self.logprobs is None):
            raise ValueError("prompt_logprobs must be True or False, and True only with logprobs")
        object.__setattr__(self, "images", tuple(self.images or ()))
        if not all(isinstance(image, Image) for image in self.images):
            raise ValueError("images must be images.Image (see Vision.prepare)")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be an llguidance grammar (a string), got {type(self.grammar).__name__}")

    def with_prompt(self, prompt: Sequence[int]) -> "GenerationRequest":
        """The same settings for other ids (e.g. flags checked before the model is loaded)."""
        return replace(self, prompt=tuple(prompt))


def token_ids(ids) -> List[int]:
    """Ids as Python ints (which ids the vocabulary has is the engine's check)."""
    try:
        out = list(ids)
    except TypeError:
        raise ValueError(f"token ids must be a list of integers, got {type(ids).__name__}") from None
    if not all(is_int(t) for t in out):
        bad = next(t for t in out if not is_int(t))
        raise ValueError(f"token ids must be integers, got {bad!r}")
    return [int(t) for t in out]


def check_vocabulary(ids: Sequence[int], vocab_size: int) -> None:
    """MLX does not bounds-check an embedding lookup: an id outside the vocabulary reads or
    crashes out of bounds, so none may reach it."""
    if not ids:
        raise ValueError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= vocab_size:  # (C loops; the slow search only on a bad id)
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def encode(tokenizer, prompt: Union[str, Sequence[int]], first: bool = True) -> List[int]:
    """Token ids of a prompt; strings get BOS only on a conversation's first turn."""
    if prompt is None:
        raise ValueError("the prompt must be text or a list of token ids, got None")
    if not isinstance(prompt, str):
        return token_ids(prompt)
    if not prompt:
        return []
    if tokenizer is None:
        raise LoadError("this target has no tokenizer: pass the prompt as a list of token ids")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # (a lone surrogate: the tokenizer would raise a TypeError)
        raise ValueError("the prompt is not valid Unicode text (it holds a lone surrogate)") from None
    special = first and (tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token))
    return tokenizer.encode(prompt, add_special_tokens=special)


def held_back(text: str, markers: Sequence[str]) -> int:
    """How many characters at the end of `text` may begin one of `markers` (kept until the
    next text tells)."""
    return max((n for m in markers for n in range(1, len(m)) if text.endswith(m[:n])), default=0)


class StopText:
    """Cuts the text at the first stop string, holding back what may begin one. Text level
    (not ids): a stop string may span tokens, or be part of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, text: str, final: bool):
        """-> (text safe to emit now, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0 if final else held_back(self.pending, self.stops)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False


class RowText:
    """A row's committed ids as text: the tokenizer's streaming detokenizer (which holds
    back partial characters), stop ids left out, cut at the first stop string."""

    def __init__(self, tokenizer, stop_ids: frozenset, stops: Sequence[str]):
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        self.stop_ids = stop_ids
        self.stop = StopText(stops) if stops else None

    def add(self, tokens: List[int], final: bool) -> Tuple[str, bool]:
        """-> (the text these ids complete, whether it reached a stop string)."""
        if self.detokenizer is None:
            return "", False
        for t in tokens:
            if t not in self.stop_ids:
                self.detokenizer.add_token(t)
        if final:
            self.detokenizer.finalize()
        text = self.detokenizer.last_segment
        return self.stop.feed(text, final) if self.stop is not None else (text, False)


class ThoughtText:
    """Splits a reply's streamed text into its thought and its answer at the template's
    thinking markers (which mlx-lm's TokenizerWrapper finds: Gemma 4's `<|channel>thought`
    and `<channel|>`, `<think>` and `</think>`, ...); the markers are shown in neither."""

    def __init__(self, start: str, end: str, prompt: str):
        self.markers = (start, end)
        self.thinking = prompt.rfind(start) > prompt.rfind(end)  # the prompt opened a thought
        self.pending = ""

    @classmethod
    def of(cls, tokenizer, prompt: str) -> Optional["ThoughtText"]:
        """For a reply to `prompt` (rendered text), if the tokenizer has a thinking channel."""
        if tokenizer is None or not getattr(tokenizer, "has_thinking", False):
            return None
        return cls(tokenizer.think_start, tokenizer.think_end, prompt)

    def feed(self, text: str, final: bool) -> Tuple[str, str]:
        """-> (thought, answer) of the text safe to show now."""
        self.pending += text
        parts = {True: [], False: []}
        while True:
            marker = self.markers[1] if self.thinking else self.markers[0]
            at = self.pending.find(marker)
            if at < 0:
                break
            parts[self.thinking].append(self.pending[:at])
            self.pending = self.pending[at + len(marker):]
            self.thinking = not self.thinking
        out = self.pending[: len(self.pending) - (0 if final else held_back(self.pending, self.markers))]
        self.pending = self.pending[len(out):]
        parts[self.thinking].append(out)
        return "".join(parts[True]), "".join(parts[False])
