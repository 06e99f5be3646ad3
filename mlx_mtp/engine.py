"""The decoding engine: rows join, take speculative rounds together, and leave.

A row is one sequence with everything that is its own: committed tokens, the hidden state
that produced the newest, sampling settings, random key, limits, stop ids, proposer state,
stats and text. `generate` is one row, `batch_generate` many, the server one per request.

    engine = Engine(pair)
    row = engine.add(prompt_ids, SamplingParams(0.7), max_tokens=64, seed=1)
    while engine.busy:
        for update in engine.step():  # text and ids committed this step, per row
            ...

Each step first runs one round (`round.run_round`) for the live rows, then reads waiting
prompts, each on its own cache in chunks (at most PREFILL_STEP ids a step), so no other row
is disturbed. A row whose prompt is read commits its first token and joins the next round;
a finished row leaves at once, and hands its conversation back to its `PromptCache`.

What a row guarantees:
- greedy rows give exactly their solo greedy output, whatever shares the batch;
- a sampled row draws only from its own key, split per round: at a fixed K, a row seeded s
  gives exactly the tokens of a solo run seeded s, whatever shares the batch and whenever
  it joined (with K chosen per round, K depends on the batch and only the distribution is
  the target's own);
- a step that raises leaves every cache and row as they were before that round (a prompt
  being read is dropped, its conversation untouched).
"""

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from numbers import Integral
from typing import List, Optional, Tuple

import mlx.core as mx

from .cache import MAX_DRAFT_TOKENS
from .round import round_keys, run_round
from .sampling import Proposal, SamplingParams, accept, group_rows
from .stats import BatchStats, Stats
from .tuning import Costs, choose_k

PREFILL_STEP = 2048  # prompt ids read per step, in one forward
NO_LIMIT = -1  # max_tokens as in mlx-lm: until a stop id or the end of the context


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

    @property
    def cached(self) -> int:
        """Number of positions in the target cache."""
        return max(len(self.tokens) - 1, 0)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache or [])

    def rewind(self, n: int) -> bool:
        """Keep only the first n >= 1 committed ids, if the sliding layers still hold the
        window those need; False (and nothing changed) otherwise. The next row reads at
        least one id, which gives it the hidden state it continues from."""
        if not 1 <= n <= len(self.tokens) or self.busy:
            return False
        position = n - 1  # of the newest kept id, which has no KV yet
        if any(c.start > (0 if c.window is None else max(0, position - c.window - 2)) for c in self.cache or []):
            return False
        for c in self.cache or []:
            c.trim_rows([c.positions[0] - position])
        if n < len(self.tokens):
            self.tokens, self.carry = self.tokens[:n], None
        return True


@dataclass
class Update:
    """What one step committed for one row."""

    row: "Row"
    tokens: List[int]
    text: str
    finish_reason: Optional[str]  # "stop", "length", "context", "interrupted", or None while the row goes on


class Row:
    def __init__(self, prompt, conversation: Optional[PromptCache], params, key, max_tokens, stop_ids, draft_tokens,
                 state, detokenizer, at_context: bool = False):
        self.prompt = prompt  # ids to read after the conversation's
        self.keeps_conversation = conversation is not None  # else nobody reads it at the end
        conversation = conversation if conversation is not None else PromptCache()
        self.conversation = conversation
        self.tokens = list(conversation.tokens)  # committed ids; tokens[-1] has no KV yet
        self.carry = conversation.carry  # [1, 1, H] hidden state that produced tokens[-1]
        self.cache = [c.copy() for c in conversation.cache] if conversation.cache else None  # while reading
        self.read = 0  # prompt ids read so far
        self.params: SamplingParams = params
        self.key = key  # None for greedy rows
        self.max_tokens = max_tokens
        self.at_context = at_context  # max_tokens is what the context leaves
        self.stop_ids = stop_ids
        self.draft_tokens = draft_tokens  # fixed K, or None: chosen per round
        self.state = state  # the proposer's state for this row
        self.detokenizer = detokenizer
        self.generated: List[int] = []
        self.stats = Stats(prompt_tokens=len(prompt))
        self.finish_reason: Optional[str] = None
        self.started = 0.0  # when the first token was committed

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
        """Commit ids; returns their text (the detokenizer holds back partial characters)."""
        if self.key is not None:
            self.key = mx.random.split(self.key, 4)[0]
        self.tokens += tokens
        self.generated += tokens
        self.carry = carry
        self.stats.generation_tokens += len(tokens)
        if tokens[-1] in self.stop_ids:
            self.finish_reason = "stop"
        elif self.remaining <= 0:
            self.finish_reason = "context" if self.at_context else "length"
        elif interrupted:
            self.finish_reason = "interrupted"
        self.stats.generation_time = time.perf_counter() - self.started
        if self.detokenizer is None:
            return ""
        for t in tokens:
            if t not in self.stop_ids:
                self.detokenizer.add_token(t)
        if self.finish_reason:
            self.detokenizer.finalize()
        return self.detokenizer.last_segment


class Engine:
    def __init__(self, pair, max_batch: int = 8):
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.pair = pair
        self.max_batch = max_batch
        self.rows: List[Row] = []  # live rows, in the batch cache's row order
        self.cache: Optional[list] = None  # per cached layer: BatchCache of the live rows
        self.waiting: deque = deque()  # rows whose prompt is still being read
        self.stats = BatchStats()
        # Set (e.g. by Ctrl-C) to end every live row after the next round. In a pipeline
        # rank 0's is the one that counts: it travels with the round's decision.
        self.interrupt = threading.Event()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(
        self,
        prompt: List[int],
        params: SamplingParams = SamplingParams(),
        max_tokens: int = 256,
        seed: Optional[int] = None,
        draft_tokens: Optional[int] = None,
        stop_ids=None,
        prompt_cache: Optional[PromptCache] = None,
    ) -> Row:
        """Queue a row: token ids to read (after the prompt cache's conversation, if any).

        draft_tokens: K every round (0: plain decoding), or None to choose K per round
        from measured costs and the live acceptance, up to the pair's default."""
        prompt = check_token_ids(prompt, self.pair.target.vocab_size)
        if not is_int(max_tokens) or not (max_tokens >= 1 or max_tokens == NO_LIMIT):
            raise ValueError(f"max_tokens must be an integer >= 1, or -1 for no limit, got {max_tokens!r}")
        if draft_tokens is not None and not (is_int(draft_tokens) and 0 <= draft_tokens <= MAX_DRAFT_TOKENS):
            raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {draft_tokens!r}")
        if seed is not None and not (is_int(seed) and 0 <= seed < 2**64):
            raise ValueError(f"seed must be an integer in 0..2**64 - 1, got {seed!r}")
        if prompt_cache is not None and prompt_cache.busy:
            raise ValueError("this prompt cache is in use by another generation")
        needed = (len(prompt_cache.tokens) if prompt_cache is not None else 0) + len(prompt)
        context = self.pair.target.max_positions
        if context and needed >= context:
            raise ValueError(f"the prompt needs {needed} positions but the target's context is {context}")
        # A row ends at the target's context (mlx-lm would go on, past trained positions).
        room = context - needed if context else sys.maxsize
        at_context = max_tokens == NO_LIMIT or room < max_tokens
        max_tokens = room if at_context else max_tokens
        key = None
        if not params.greedy:
            key = mx.random.key(seed if seed is not None else mx.random.randint(0, 2**31 - 1).item())
        proposer = self.pair.proposer
        tokenizer = self.pair.tokenizer
        row = Row(
            prompt,
            prompt_cache,
            params,
            key,
            max_tokens,
            frozenset(self.pair.eos_ids if stop_ids is None else stop_ids),
            draft_tokens,
            proposer.new_state() if proposer is not None else None,
            tokenizer.detokenizer if tokenizer is not None else None,
            at_context,
        )
        row.conversation.busy = True
        self.waiting.append(row)
        return row

    def remove(self, row: Row):
        """Take a row out now (finished or not), handing back its conversation."""
        if row in self.waiting:
            self.waiting.remove(row)
            row.conversation.busy = False
        elif row in self.rows:
            self._leave([row])

    def step(self) -> List[Update]:
        """One round for the live rows, then up to PREFILL_STEP prompt ids of waiting rows."""
        updates = []
        if not self.rows and self.pair.stale_costs:  # no stream under way: this pause delays first tokens only
            self.pair.remeasure_stale_costs()
        if self.rows:
            updates += self._round()
        tic = time.perf_counter()
        budget, fresh, read, reading = PREFILL_STEP, [], [], []
        try:
            while self.waiting and budget > 0 and len(self.rows) + len(fresh) + len(read) < self.max_batch:
                row = self.waiting[0]
                if not row.stats.prompt_time:
                    row.stats.prompt_time = -tic  # until its first token
                if not row.tokens and row.read == 0 and len(row.prompt) <= budget:
                    fresh.append(self.waiting.popleft())  # read below, with others of its length
                    budget -= len(row.prompt)
                    continue
                reading = [row]
                budget -= self._read(row, budget)
                if row.read < len(row.prompt):
                    mx.eval([c.keys for c in row.cache])  # one chunk at a time
                    break
                read.append((self.waiting.popleft(),))
            updates += self._first_tokens(read + self._read_fresh(fresh))
        except BaseException:
            for row in fresh + [r for group in read for r in group] + reading:
                self.remove(row)  # dropped: its conversation as it was
                row.conversation.busy = False
            raise
        finally:
            self.stats.prompt_time += time.perf_counter() - tic
        return updates

    def _read(self, row: Row, budget: int) -> int:
        """Read up to `budget` more prompt ids of a waiting row, on its own cache (lazily)."""
        target = self.pair.target
        if row.cache is None:
            row.cache = target.make_cache()
        # The pending token of an earlier turn is read first.
        pending = row.tokens[-1:] if row.tokens and row.read == 0 else []
        n = min(budget, len(row.prompt) - row.read)
        hidden = target.hidden(mx.array(pending + row.prompt[row.read : row.read + n])[None], row.cache)
        row.read += n
        row.carry = hidden[:, -1:]
        return n

    def _read_fresh(self, rows: List[Row]) -> List[tuple]:
        """Read new rows' prompts, those of one length in one forward (no padding: every
        row of the forward is at the same positions). Returns the groups."""
        groups = []
        for _, index in group_rows([len(r.prompt) for r in rows]):
            group = tuple(rows[i] for i in index)
            cache = self.pair.target.make_cache(len(group))
            hidden = self.pair.target.hidden(mx.array([r.prompt for r in group]), cache)
            for i, row in enumerate(group):
                row.read, row.carry = len(row.prompt), hidden[i : i + 1, -1:]
            group[0].cache = cache  # the group's rows join together
            groups.append(group)
        return groups

    def _first_tokens(self, groups: List[tuple]) -> List[Update]:
        """The token after each prompt (one evaluation for all); each group of rows read
        together joins the batch, and rows that token finished leave it at once."""
        tokens = []
        pipeline = self.pair.target.pipeline
        for group in groups:
            # A round that drafts nothing: the same rule and the same keys as a round's last token.
            carry = mx.concatenate([r.carry for r in group])
            logits = self.pair.target.logits(carry)  # [G, 1, V]
            keys = round_keys(group)
            empty = Proposal(mx.zeros((len(group), 0), mx.int32))
            _, ids = accept(logits, empty, [0] * len(group), [r.params for r in group],
                            None if keys is None else keys[:, 1:], [r.tokens + r.prompt for r in group])
            ids = ids[:, 0]
            if pipeline is not None:  # rank 0's ids; each group's forward runs in turn on every rank
                ids = pipeline.share(ids.astype(mx.int32), after=carry)
                mx.async_eval(ids)
            tokens.append(ids)
        mx.eval(tokens, [r.carry for group in groups for r in group])
        updates, finished = [], []
        for group, ids in zip(groups, tokens):
            for row, token in zip(group, ids.tolist()):
                row.tokens += row.prompt
                row.started = time.perf_counter()
                row.stats.prompt_time += row.started
                text = row.commit([token], row.carry)
                updates.append(Update(row, [token], text, row.finish_reason))
                if row.finish_reason:
                    finished.append(row)
            self._join(group)
        self.stats.generation_tokens += len(updates)
        if finished:
            self._leave(finished)
        return updates

    def _join(self, rows: tuple):
        """Rows read together (their cache held by the first) join the batch."""
        if self.cache is None:
            self.cache = rows[0].cache
        else:
            for mine, theirs in zip(self.cache, rows[0].cache):
                mine.extend(theirs)
        rows[0].cache = None
        self.rows += rows

    def _leave(self, rows: List[Row]):
        """Rows free their slots at once; each hands back its conversation."""
        for i, row in enumerate(self.rows):
            if row in rows:
                # The only row keeps the batch cache as it is; others take a copy of theirs.
                alone = len(self.rows) == 1
                self._hand_back(row, lambda: self.cache if alone else [c.extract(i) for c in self.cache])
        keep = [i for i, row in enumerate(self.rows) if row not in rows]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
        for c in self.cache or []:
            c.keep_rows(keep)

    @staticmethod
    def _hand_back(row: Row, cache):
        """The row's conversation, free again; updated if the caller keeps it (`cache()`
        gives the row's target cache)."""
        conversation = row.conversation
        conversation.busy = False
        if row.keeps_conversation:
            conversation.cache, conversation.tokens, conversation.carry = cache(), row.tokens, row.carry
            mx.eval([(c.keys, c.values) for c in conversation.cache])  # its own copy, not a view of the batch

    def _round(self) -> List[Update]:
        tic = time.perf_counter()
        rows = self.rows
        counts, costs = self._draft_counts(rows)
        started = time.perf_counter()
        results = run_round(self.pair.target, self.pair.proposer, rows, self.cache, counts,
                            [r.remaining for r in rows], self.interrupt.is_set())
        if costs is not None:  # K came from the measured costs: check them against this round
            drafter = any(r.source == "mtp" for r in results)
            self.pair.observe_round(costs, max(counts), drafter, time.perf_counter() - started)
        updates = []
        for row, result in zip(rows, results):
            text = row.commit(result.committed, result.carry, result.interrupted)
            row.stats.add_round(result.drafted, result.accepted, result.source, len(result.committed))
            updates.append(Update(row, result.committed, text, row.finish_reason))
        self.stats.rounds += 1
        self.stats.live_rows.append(len(rows))
        self.stats.draft_tokens.append(max(counts))
        self.stats.generation_tokens += sum(len(r.committed) for r in results)
        finished = [row for row in rows if row.finish_reason]
        if finished:
            self._leave(finished)
        self.stats.generation_time += time.perf_counter() - tic
        return updates

    def _draft_counts(self, rows: List[Row]) -> Tuple[List[int], Optional[Costs]]:
        """Per row, drafts this round: its fixed K, or for the others one K chosen from the
        measured costs of a forward over these rows and their live acceptance; and those
        costs (None if no row's K came from them)."""
        pair = self.pair
        if pair.proposer is None:
            return [0] * len(rows), None
        auto = [r for r in rows if r.draft_tokens is None] if pair.default_draft_tokens > 0 else []
        k_auto, costs = 0, None
        if auto:
            sources = [pair.proposer.next_source(r.state, r.tokens) for r in auto]
            costs = pair.draft_costs(len(rows))
            k_auto = choose_k(costs, [r.stats for r in auto], sources, pair.default_draft_tokens)
        counts = [min(k_auto if r.draft_tokens is None else r.draft_tokens, r.remaining - 1) for r in rows]
        return counts, costs


def is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def check_token_ids(ids, vocab_size: int) -> List[int]:
    """Prompt ids as Python ints, each checked against the vocabulary (MLX does not
    bounds-check an embedding lookup: an id past it reads or crashes out of bounds)."""
    out = []
    for t in ids:
        if not is_int(t):
            raise ValueError(f"token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"token id {t} is outside the vocabulary (0..{vocab_size - 1})")
        out.append(int(t))
    if not out:
        raise ValueError("the prompt is empty")
    return out
