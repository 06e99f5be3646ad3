"""A row (one sequence in the engine) and a prompt cache (a conversation between rows)."""

import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..decoding.round import as_lists, scored
from ..decoding.sampling import token_logprobs
from ..images import image_spans
from ..models.target import ChunkImages
from ..request import GenerationRequest, RowText
from .stats import Stats


@dataclass
class PromptCache:
    """A conversation between calls: its committed ids, the hidden state that produced the
    newest, and the target cache of every committed position but the newest. A row starting
    from it reads only new ids, and hands it back updated when it ends (also when stopped
    early or by an exception: then with what was committed until then)."""

    cache: Optional[list] = None  # per cached layer: a one-row BatchCache
    tokens: List[int] = field(default_factory=list)
    carry: Optional[mx.array] = None  # [1, 1, H]
    busy: bool = False  # lent to a live row
    # per image among the ids: (first soft token's position, soft tokens, sha256 of its bytes),
    # for two images have the same ids
    images: Tuple[Tuple[int, int, str], ...] = ()

    @property
    def cached(self) -> int:
        """Number of positions in the target cache."""
        return max(len(self.tokens) - 1, 0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache or [])

    def rewind(self, n: int) -> bool:
        """Keep only the first n >= 1 committed ids, if the caches still hold what those
        need; False (and nothing changed) otherwise. The next row reads at least one id,
        which gives it the hidden state it continues from."""
        if not 1 <= n <= len(self.tokens) or self.busy:
            return False
        position = n - 1  # of the newest kept id, which has no KV yet
        if not all(c.can_rewind(position) for c in self.cache or []):
            return False
        if any(start <= position < start + length for start, length, _ in self.images):
            return False  # (its soft tokens would be read again without the image)
        for c in self.cache or []:
            c.rewind(position)
        if n < len(self.tokens):
            self.tokens, self.carry = self.tokens[:n], None
            self.images = tuple(span for span in self.images if span[0] < position)
        return True


@dataclass
class Update:
    """What one step committed for one row."""

    row: "Row"
    tokens: List[int]
    text: str
    finish_reason: Optional[str]  # "stop", "length", "context", "interrupted", "error" (`Row.error`), or None
    logprobs: Optional[list] = None  # per token, if the request asked: (log-prob, [(id, log-prob)] of the top)
    # with the first token, if the request asked: the same per prompt id but the first of a new conversation
    prompt_logprobs: Optional[list] = None


class PromptImages:
    """A row's images where its prompt holds their soft tokens (positions from the prompt's
    start), and their embeddings from the vision tower (lazy: computed with the first chunk
    that reads them)."""

    def __init__(self, prompt: List[int], images, target):
        vision = target.vision
        self.spans = image_spans(prompt, images, vision)  # [(start, length, digest)] per image
        self.pad = vision.pad_token
        self.features = mx.concatenate(vision.tower(target.hidden_size, target.dtype)(images))  # [N, H]
        at = np.zeros(len(prompt), bool)
        blocks = np.full(len(prompt), -1, np.int32)
        for b, (start, length, _) in enumerate(self.spans):
            at[start : start + length] = True
            blocks[start : start + length] = b
        self.at, self.index = at, np.maximum(np.cumsum(at) - 1, 0)  # soft token -> its embedding
        self.blocks = blocks if vision.bidirectional else None

    def chunk_size(self, start: int, n: int) -> int:
        """n, or more so that the chunk from `start` ends no image part-way (an image's
        soft tokens may attend to each other both ways)."""
        end = start + n
        for first, length, _ in self.spans:
            if first < end < first + length:
                return first + length - start
        return n

    def chunk(self, tokens: mx.array, start: int, pending: int):
        """The ids [1, pending + T] of prompt positions start.. (after `pending` ids before
        the prompt) with the pad id on soft tokens, and their `ChunkImages`."""
        T = tokens.shape[1] - pending
        at = np.concatenate([np.zeros(pending, bool), self.at[start : start + T]])[None]  # [1, pending + T]
        index = np.concatenate([np.zeros(pending, np.int64), self.index[start : start + T]])
        embeddings = self.features[mx.array(index)][None]  # [1, pending + T, H]
        blocks = None
        if self.blocks is not None:
            blocks = mx.array(np.concatenate([np.full(pending, -1, np.int32), self.blocks[start : start + T]])[None])
        at = mx.array(at)
        return mx.where(at, self.pad, tokens), ChunkImages(at, embeddings, blocks)

    def spans_at(self, offset: int) -> Tuple[Tuple[int, int, str], ...]:
        """The spans in a conversation where the prompt starts at `offset`."""
        return tuple((offset + start, length, d) for start, length, d in self.spans)


class Row:
    """One sequence: its request, its committed ids and the hidden state that produced the
    newest, its random key, proposer state, stats and text."""

    def __init__(self, request: GenerationRequest, conversation: Optional[PromptCache], key: Optional[mx.array],
                 max_tokens: int, at_context: bool, stop_ids: frozenset, state, text: RowText, constraint=None):
        self.request = request
        self.prompt = list(request.prompt)  # ids to read after the conversation's
        self.stop_ids = stop_ids  # the request's, or the pair's EOS ids
        self.keeps_conversation = conversation is not None  # else nobody reads it at the end
        conversation = conversation if conversation is not None else PromptCache()
        self.conversation = conversation
        self.tokens = list(conversation.tokens)  # committed ids; tokens[-1] has no KV yet
        self.carry = conversation.carry  # [1, 1, H] hidden state that produced tokens[-1]
        self.key = key  # None for greedy rows
        self.max_tokens = max_tokens  # the request's, or what the context leaves
        self.at_context = at_context
        self.state = state  # the proposer's state for this row
        self.text = text
        self.constraint = constraint  # the grammar's state (decoding.grammar.Constraint), or None
        self.generated: List[int] = []
        self.prompt_scores: list = []  # (log-prob, top) of the prompt ids read so far, if asked
        self.images: Optional[PromptImages] = None  # set when its prompt starts being read
        self.image_spans = conversation.images  # the conversation's, then also the prompt's
        self.stats = Stats(prompt_tokens=len(self.prompt))
        self.finish_reason: Optional[str] = None
        self.started = 0.0  # when the first token was committed

    @property
    def params(self):
        return self.request.params

    @property
    def draft_tokens(self) -> Optional[int]:
        """Fixed K, or None: chosen per round."""
        return self.request.draft_tokens

    @property
    def error(self) -> Optional[str]:
        """Why the row could not go on (finish_reason "error"): its grammar engine failed."""
        return None if self.constraint is None else self.constraint.error

    @property
    def position(self) -> int:
        """Position of the newest committed token (the next one the target reads)."""
        return len(self.tokens) - 1

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    def round_keys(self) -> Optional[mx.array]:
        """[3, 2]: keys of this round's drafts, accept draws and last token (None: greedy)."""
        return None if self.key is None else mx.random.split(self.key, 4)[1:]

    def commit(self, tokens: List[int], carry: mx.array, interrupted: bool = False) -> str:
        """Commit ids; returns their text (held back: partial characters, and what may
        begin a stop string; a stop string ends the row)."""
        if self.key is not None:
            self.key = mx.random.split(self.key, 4)[0]
        self.tokens += tokens
        self.generated += tokens
        if self.constraint is not None:
            self.constraint.commit(tokens)
        self.carry = carry
        self.stats.generation_tokens += len(tokens)
        if self.error is not None:
            self.finish_reason = "error"
        elif tokens[-1] in self.stop_ids:
            self.finish_reason = "stop"
        elif self.remaining <= 0:
            self.finish_reason = "context" if self.at_context else "length"
        elif interrupted:
            self.finish_reason = "interrupted"
        self.stats.generation_time = time.perf_counter() - self.started
        text, stopped = self.text.add(tokens, final=self.finish_reason is not None)
        if stopped:
            self.finish_reason = "stop"
        return text


SCORE_BYTES = 1 << 28  # logits scored at once, when a prompt's ids are scored


class Reading:
    """Rows whose prompts are being read together, a chunk per forward, into a cache of
    their own: one row (continuing its conversation's cache, on a copy), or new rows of one
    prompt length (every row at the same positions: no padding)."""

    def __init__(self, rows: List[Row], target):
        self.rows = rows
        conversation = rows[0].conversation.cache
        self.cache = [c.copy() for c in conversation] if conversation else target.make_cache(len(rows))
        self.read = 0  # prompt ids read so far, per row
        if rows[0].request.images:  # (rows with images are read one by one)
            rows[0].images = PromptImages(rows[0].prompt, rows[0].request.images, target)

    @property
    def left(self) -> int:
        return len(self.rows[0].prompt) - self.read

    def chunk_size(self, step: int) -> int:
        """Ids the next chunk reads: `step`, or what is left, or up to the end of an image."""
        n = min(step, self.left)
        images = self.rows[0].images
        return n if images is None else images.chunk_size(self.read, n)

    def read_chunk(self, target, n: int):
        """Read the next n prompt ids of every row (lazily); a row that continues a
        conversation reads its pending newest id first."""
        pending = self.rows[0].tokens[-1:] if self.read == 0 else []
        chunk = mx.array([pending + row.prompt[self.read : self.read + n] for row in self.rows])
        images = self.rows[0].images
        if images is None:
            hidden = target.hidden(chunk, self.cache)  # [R, n (+1), H]
        else:
            chunk, soft = images.chunk(chunk, self.read, len(pending))
            hidden = target.hidden(chunk, self.cache, soft)
        self.read += n
        if any(row.request.prompt_logprobs for row in self.rows):
            # each position scores the id after it; the prompt's last one, the first token
            after = [(pending + row.prompt[self.read - n : self.read + 1])[1:] for row in self.rows]
            self._score(target, hidden[:, : len(after[0])], mx.array(after))
        if not self.left:
            for i, row in enumerate(self.rows):
                row.carry = hidden[i : i + 1, -1:]

    def _score(self, target, hidden: mx.array, after: mx.array):
        """Each asking row's log-probs of the ids `after` [R, T] under `hidden` [R, T, H],
        through the head a slice of positions at a time (a [R, T, V] float32 array of a
        2048-id chunk would take gigabytes)."""
        top = max(row.request.logprobs for row in self.rows if row.request.prompt_logprobs)
        R, T = after.shape
        step = max(1, SCORE_BYTES // (4 * R * target.vocab_size))
        for start in range(0, T, step):
            part = token_logprobs(target.logits(hidden[:, start : start + step]), after[:, start : start + step], top)
            mx.eval(part)
            part = as_lists(part)
            for i, row in enumerate(self.rows):
                if row.request.prompt_logprobs:
                    row.prompt_scores += scored(part, i, len(part[0][i]), row.request.logprobs)

    def drop(self, row: Row):
        keep = [i for i, r in enumerate(self.rows) if r is not row]
        for c in self.cache:
            c.keep_rows(keep)
        self.rows = [self.rows[i] for i in keep]
