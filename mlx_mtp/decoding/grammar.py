"""Structured output: a grammar decides which ids a row may commit (llguidance).

A row with a grammar has a `Constraint`: llguidance's matcher over the ids it committed.
Each round (round.py) it gives, on the host:
- the ids the grammar forces next (a schema's keys and punctuation): proposed as drafts
  with q = 1, which the masked target accepts with certainty where the grammar allows one
  id only;
- how many of the proposer's drafts the grammar allows: the rest are cut before the
  verify forward;
- a mask per verified position (after the row's committed ids and its drafts before that
  position), which the target's distribution is masked with before acceptance. So a greedy
  row gives exactly what constrained decoding of the target alone gives, and a sampled
  row draws from the target's constrained distribution.

Why llguidance (measured, docs/serving.md): no dependencies, a mask in tens of
microseconds over Gemma's 262,144 ids, exact rollback, and masks for a run of drafts at
once.
"""

import json
import threading
import weakref
from functools import lru_cache
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

# How a schema's JSON is laid out where the schema's own "x-guidance" does not say: the
# spacing models write (`{"a": 1, "b": 2}`), with no free whitespace, so that keys and
# punctuation are forced ids (drafted with certainty) and a small model cannot loop on
# blank lines.
LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:  # (a dependency of mlx-mtp: only a broken install lacks it)
        raise ValueError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


# Bounds on a schema, checked before llguidance sees it: its checker crashed the process
# (a segfault, not an exception) on a chain of about 1,100 `$ref`s (an 82 KB schema).
MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_REFS = 64 * 1024, 32, 64


def check_schema_size(schema: dict):
    """A ValueError if the schema passes the bounds above."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes")
    refs, nodes = 0, [(schema, 1)]
    while nodes:
        node, depth = nodes.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        refs += isinstance(node, dict) and "$ref" in node
        nodes += [(child, depth + 1) for child in children]
    if refs > MAX_SCHEMA_REFS:
        raise ValueError(f"the JSON schema has more than {MAX_SCHEMA_REFS} '$ref's")


def json_grammar(schema: Optional[dict] = None) -> str:
    """llguidance's grammar for a JSON value of `schema` (None: any JSON object, as
    OpenAI's `json_object`)."""
    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise ValueError("a JSON schema must be an object")
    check_schema_size(schema)
    try:
        return llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=LAYOUT)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the JSON schema cannot be compiled: {e}") from None


def grammar_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's view of an mlx-lm tokenizer (built once per tokenizer: about a
    second for Gemma's vocabulary)."""
    with _lock:
        built = _tokenizers.get(tokenizer)
        if built is None:
            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            backend = getattr(hf, "backend_tokenizer", None)
            if backend is None:
                raise ValueError("structured output needs a fast (tokenizer.json) tokenizer")
            eos = sorted(t for t in eos_ids if 0 <= t < vocab_size)
            built = llguidance().LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
            _tokenizers[tokenizer] = built
    return built


class Constraint:
    """One row's grammar state: the matcher over the ids the row committed."""

    def __init__(self, grammar: str, tokenizer):
        lib = llguidance()
        self.matcher = lib.LLMatcher(tokenizer, grammar, log_level=0)  # (its errors are ours to report)
        if self.matcher.is_error():  # (what validation finds, and limits only a built matcher shows)
            raise ValueError(f"the grammar cannot be compiled: {self.matcher.get_error().strip().splitlines()[0]}")
        self.vocab_size = tokenizer.vocab_size

    def forced(self) -> List[int]:
        """The ids the grammar allows alone next, in order (empty: a choice to make)."""
        return list(self.matcher.compute_ff_tokens())

    def allowed(self, drafts: Sequence[int]) -> int:
        """How many of `drafts`, from the first, the grammar allows."""
        return self.matcher.validate_tokens(list(drafts))

    def commit(self, tokens: Sequence[int]):
        """Advance past committed ids (every one allowed: they were drawn under its masks;
        once the grammar is complete it takes nothing more, and the EOS after it ends the row)."""
        for token in tokens:
            if self.matcher.is_stopped() or not self.matcher.consume_token(token):
                break

    @property
    def error(self) -> Optional[str]:
        """Why the matcher stopped, if it failed (an allowed id can still pass one of
        llguidance's limits, e.g. on how ambiguous a grammar may get): the row cannot go on."""
        return self.matcher.get_error().strip().splitlines()[0] if self.matcher.is_error() else None


def allowed_ids(constraints: List[Optional[Constraint]], drafts: List[List[int]], width: int,
                vocab_size: int) -> mx.array:
    """[B, width, V] bool: per row, the ids its grammar allows at each verified position
    (after its committed ids and its drafts before that position); True everywhere for a
    row without one, and past a row's drafts + 1."""
    lib = llguidance()
    B = len(constraints)
    words = (vocab_size + 31) // 32
    bits = np.full((B * width, words), -1, dtype=np.int32)  # [B * width, V / 32]: bit j of word w is id 32w + j
    rows = [(c.matcher, i * width, list(d)) for i, (c, d) in enumerate(zip(constraints, drafts)) if c is not None]
    drafting, plain = [r for r in rows if r[2]], [r[:2] for r in rows if not r[2]]
    if drafting:  # (the library's draft form takes no empty runs)
        lib.numpy.fill_next_token_bitmask_par_with_draft_tokens(_executor(), drafting, bits)
    if plain:
        lib.numpy.fill_next_token_bitmask_par(_executor(), plain, bits)
    # unpacked in MLX: 32x less to copy than a bool array
    unpacked = (mx.array(bits)[..., None] >> mx.arange(32, dtype=mx.int32)) & 1  # [B * width, V / 32, 32]
    return unpacked.reshape(B, width, words * 32)[..., :vocab_size].astype(mx.bool_)


@lru_cache(maxsize=1)
def _executor():
    """llguidance's worker pool for the masks of several rows at once (one per process)."""
    return llguidance().LLExecutor()
