"""The decoding engine: rows join, take speculative rounds together, and leave.

A row is one sequence with everything that is its own: committed tokens, the hidden state
that produced the newest, sampling settings, random key, limits, stop ids, proposer state,
stats and text. `generate` is one row, `batch_generate` many, the server one per request.

    engine = Engine(pair)
    row = engine.add(GenerationRequest(prompt_ids, SamplingParams(0.7), max_tokens=64, seed=1))
    while engine.busy:
        for update in engine.step():  # text and ids committed this step, per row
            ...

Each step first runs one round (`round.run_round`) for the live rows, then reads prompt
chunks of the rows waiting to join, on caches of their own, so no other row is disturbed.
A prompt is cut into chunks of `prefill_step_size` ids from its start, whatever else runs
(the cut changes the floating-point sums, so it must not depend on the load); each step
reads chunks of the rows being read in turn, up to `prefill_step_size` ids in all and at
least one chunk. So a long prompt adds at most one chunk's time to each decoding step, and
a short prompt behind it is read at its first turn, not after it (turns, not arrival order,
share the prefill). A row whose prompt is read commits its first token and joins the next
round; a finished row leaves at once, and hands its conversation back to its `PromptCache`.

What a row guarantees:
- greedy rows give exactly their solo greedy output, whatever shares the batch (at the
  same prefill_step_size);
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
from typing import List, Optional, Tuple, Union

import mlx.core as mx

from ..decoding.grammar import Constraint, allowed_ids, grammar_tokenizer
from ..decoding.proposers import Proposer, make_proposer
from ..decoding.round import as_lists, round_keys, run_round, scored
from ..decoding.sampling import Proposal, accept, token_logprobs
from ..images import check_count, check_placed
from ..request import NO_LIMIT, GenerationRequest, RowText, check_vocabulary, is_int
from .costs import Costs, CostModel, choose_k
from .rows import PromptCache, Reading, Row, Update
from .stats import BatchStats


class Engine:
    """Rows of one pair, decoded together. proposer: who drafts for every row (a name, see
    `make_proposer`, or a Proposer). costs: what rounds cost, for choosing K (default: the
    pair's one cost model in this process). prefill_step_size: prompt ids read per step, and
    the chunk a prompt is cut into (default: the cost model's, from measured forwards)."""

    def __init__(self, pair, max_batch: int = 8, proposer: Union[str, Proposer] = "hybrid",
                 costs: Optional[CostModel] = None, prefill_step_size: Optional[int] = None):
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if prefill_step_size is not None and (not is_int(prefill_step_size) or prefill_step_size < 1):
            raise ValueError(f"prefill_step_size must be an integer >= 1, got {prefill_step_size!r}")
        self.pair = pair
        self.max_batch = max_batch
        if isinstance(proposer, str):
            proposer = make_proposer(proposer, pair.target, pair.drafter, pair.drafter_on_rank_0)
        elif not callable(getattr(proposer, "propose", None)):
            raise ValueError(f"proposer must be a name or a Proposer, got {type(proposer).__name__}")
        self.proposer = proposer
        self.costs = costs if costs is not None else CostModel.of(pair)
        self._prefill_step_size = prefill_step_size
        self.rows: List[Row] = []  # live rows, in the batch cache's row order
        self.cache: Optional[list] = None  # per cached layer: BatchCache of the live rows
        self.waiting: deque = deque()  # rows not yet being read
        self.reading: deque = deque()  # Readings under way, the next to read a chunk first
        self.stats = BatchStats()
        # Set (e.g. by Ctrl-C) to end every live row after the next round. In a pipeline
        # rank 0's is the one that counts: it travels with the round's decision.
        self.interrupt = threading.Event()

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or self.reading)

    @property
    def prefill_step_size(self) -> int:
        if self._prefill_step_size is None:  # measured on first use, like the costs of rounds
            self._prefill_step_size = self.costs.prefill_step_size()
        return self._prefill_step_size

    def add(self, request: GenerationRequest, prompt_cache: Optional[PromptCache] = None) -> Row:
        """Queue a row for `request` (its prompt read after the prompt cache's
        conversation, if any). Checks what only the loaded pair knows: the ids against the
        vocabulary, the positions against the context."""
        check_vocabulary(request.prompt, self.pair.target.vocab_size)
        vision = self.pair.target.vision
        if request.images or (vision is not None and vision.image_token in request.prompt):
            # (soft tokens without their image: transformers refuses them too)
            if self.pair.target.pipeline is not None:
                raise ValueError("images are not available when the target is split over ranks")
            check_count(len(request.images), vision)
            check_placed(request.prompt, request.images, vision)
            vision.tower(self.pair.target.hidden_size, self.pair.target.dtype)  # loaded now: errors are the request's
        if request.logprobs is not None and self.pair.target.pipeline is not None:
            raise ValueError("logprobs are not available when the target is split over ranks")
        if prompt_cache is not None and prompt_cache.busy:
            raise ValueError("this prompt cache is in use by another generation")
        needed = (len(prompt_cache.tokens) if prompt_cache is not None else 0) + len(request.prompt)
        context = self.pair.target.max_positions
        if context and needed >= context:
            raise ValueError(f"the prompt needs {needed} positions but the target's context is {context}")
        # A row ends at the target's context (mlx-lm would go on, past trained positions).
        room = context - needed if context else sys.maxsize
        at_context = request.max_tokens == NO_LIMIT or room < request.max_tokens
        max_tokens = room if at_context else request.max_tokens
        key = None
        if not request.params.greedy:
            seed = request.seed if request.seed is not None else mx.random.randint(0, 2**31 - 1).item()
            key = mx.random.key(seed)
        stop_ids = self.pair.eos_ids if request.stop_ids is None else request.stop_ids
        constraint = None if request.grammar is None else self._constraint(request.grammar)
        state = self.proposer.new_state() if self.proposer is not None else None
        row = Row(request, prompt_cache, key, max_tokens, at_context, stop_ids, state,
                  RowText(self.pair.tokenizer, stop_ids, request.stop), constraint)
        row.conversation.busy = True
        self.waiting.append(row)
        return row

    def _constraint(self, grammar: str) -> Constraint:
        """A row's grammar state (ValueError: no tokenizer, a pipeline, a bad grammar)."""
        if self.pair.tokenizer is None:
            raise ValueError("structured output needs the target's tokenizer")
        if self.pair.target.pipeline is not None:
            raise ValueError("structured output is not available when the target is split over ranks")
        tokenizer = grammar_tokenizer(self.pair.tokenizer, self.pair.target.vocab_size, self.pair.eos_ids)
        return Constraint(grammar, tokenizer)

    def remove(self, row: Row):
        """Take a row out now (finished or not), handing back its conversation."""
        reading = next((r for r in self.reading if row in r.rows), None)
        if row in self.rows:
            return self._leave([row])
        if row in self.waiting:
            self.waiting.remove(row)
        elif reading is not None:
            reading.drop(row)
            if not reading.rows:
                self.reading.remove(reading)
        else:
            return  # gone already
        row.conversation.busy = False

    def step(self) -> List[Update]:
        """One round for the live rows, then prompt chunks of waiting rows."""
        updates = []
        if not self.rows and self.costs.stale:  # no stream under way: this pause delays first tokens only
            self.costs.remeasure_stale()
        if self.rows:
            updates += self._round()
        tic = time.perf_counter()
        try:
            updates += self._prefill(tic)
        finally:
            self.stats.prompt_time += time.perf_counter() - tic
        return updates

    def _prefill(self, tic: float) -> List[Update]:
        """Read chunks of the prompts being read, one Reading after another, up to
        prefill_step_size ids (at least one chunk); rows whose prompt is read commit their
        first token and join."""
        self._start_reading(tic)
        step = budget = self.prefill_step_size
        touched, done = [], []
        try:
            for reading in list(self.reading):
                n = reading.chunk_size(step)
                if touched and n > budget:
                    continue  # its turn stays
                touched.append(reading)
                reading.read_chunk(self.pair.target, n)
                budget -= n
                self.reading.remove(reading)  # its turn is over
                if reading.left:
                    self.reading.append(reading)
                else:
                    done.append(reading)
            mx.eval([c.keys for r in self.reading for c in r.cache])  # chunks of prompts not done
            return self._first_tokens(done)
        except BaseException:
            for reading in touched:  # dropped: their conversations as they were
                for row in list(reading.rows):
                    self.remove(row)
                    row.conversation.busy = False  # (also if its reading was done: no longer listed)
            raise

    def _start_reading(self, tic: float):
        """Waiting rows start being read, in order, while the batch has slots. A row that
        continues a conversation is read on a copy of its cache; new rows of one prompt
        length waiting together are read together, in one forward per chunk."""
        slots = self.max_batch - len(self.rows) - sum(len(r.rows) for r in self.reading)
        while self.waiting and slots > 0:
            first = self.waiting.popleft()
            rows = [first]
            if not first.tokens and not first.request.images:
                rows += [r for r in self.waiting if not r.tokens and not r.request.images
                         and len(r.prompt) == len(first.prompt)][: slots - 1]
                for row in rows[1:]:
                    self.waiting.remove(row)
            for row in rows:
                row.stats.prompt_time = -tic  # until its first token
            self.reading.append(Reading(rows, self.pair.target))
            slots -= len(rows)

    def _first_tokens(self, readings: List[Reading]) -> List[Update]:
        """The token after each prompt (one evaluation for all); each Reading's rows join
        the batch, and rows that token finished leave it at once."""
        tokens, scores = [], []
        pipeline = self.pair.target.pipeline
        for group in (r.rows for r in readings):
            # A round that drafts nothing: the same rule and the same keys as a round's last token.
            carry = mx.concatenate([r.carry for r in group])
            logits = self.pair.target.logits(carry)  # [G, 1, V]
            keys = round_keys(group)
            empty = Proposal(mx.zeros((len(group), 0), mx.int32))
            constraints = [r.constraint for r in group]
            allowed = None
            if any(c is not None for c in constraints):
                allowed = allowed_ids(constraints, [[]] * len(group), 1, self.pair.target.vocab_size)
            _, ids = accept(logits, empty, [0] * len(group), [r.params for r in group],
                            None if keys is None else keys[:, 1:], [r.tokens + r.prompt for r in group], allowed)
            ids = ids[:, 0]
            if pipeline is not None:  # rank 0's ids; each group's forward runs in turn on every rank
                ids = pipeline.share(ids.astype(mx.int32), after=carry)
                mx.async_eval(ids)
            tokens.append(ids)
            top = max((r.request.logprobs for r in group if r.request.logprobs is not None), default=None)
            scores.append(None if top is None else token_logprobs(logits, ids[:, None], top))
        mx.eval(tokens, [r.carry for reading in readings for r in reading.rows], scores)
        updates, finished = [], []
        for reading, ids, group_scores in zip(readings, tokens, map(as_lists, scores)):
            for i, (row, token) in enumerate(zip(reading.rows, ids.tolist())):
                if row.images is not None:
                    row.image_spans += row.images.spans_at(len(row.tokens))
                row.tokens += row.prompt
                row.started = time.perf_counter()
                row.stats.prompt_time += row.started
                text = row.commit([token], row.carry)
                n = row.request.logprobs
                updates.append(Update(row, [token], text, row.finish_reason,
                                      None if n is None else scored(group_scores, i, 1, n),
                                      row.prompt_scores if row.request.prompt_logprobs else None))
                if row.finish_reason:
                    finished.append(row)
            self._join(reading)
        self.stats.generation_tokens += len(updates)
        if finished:
            self._leave(finished)
        return updates

    def _join(self, reading: Reading):
        """Rows read together join the batch, with their cache."""
        if self.cache is None:
            self.cache = reading.cache
        else:
            for mine, theirs in zip(self.cache, reading.cache):
                mine.extend(theirs)
        self.rows += reading.rows

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
            conversation.images = row.image_spans
            mx.eval([(c.keys, c.values) for c in conversation.cache])  # its own copy, not a view of the batch

    def _round(self) -> List[Update]:
        tic = time.perf_counter()
        rows = self.rows
        counts, costs = self._draft_counts(rows)
        started = time.perf_counter()
        results = run_round(self.pair.target, self.proposer, rows, self.cache, counts,
                            [r.remaining for r in rows], self.interrupt.is_set())
        if costs is not None:  # K came from the measured costs: check them against this round
            drafter = any(r.source == "mtp" for r in results)
            self.costs.observe_round(costs, max(counts), drafter, time.perf_counter() - started)
        updates = []
        for row, result in zip(rows, results):
            text = row.commit(result.committed, result.carry, result.interrupted)
            row.stats.add_round(result.drafted, result.accepted, result.source, len(result.committed))
            updates.append(Update(row, result.committed, text, row.finish_reason, result.logprobs))
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
        if self.proposer is None:
            return [0] * len(rows), None
        k_max = self.pair.default_draft_tokens
        auto = [r for r in rows if r.draft_tokens is None] if k_max > 0 else []
        k_auto, costs = 0, None
        if auto:
            sources = [self.proposer.next_source(r.state, r.tokens) for r in auto]
            costs = self.costs.for_rows(len(rows))
            k_auto = choose_k(costs, [r.stats for r in auto], sources, k_max)
        counts = [min(k_auto if r.draft_tokens is None else r.draft_tokens, r.remaining - 1) for r in rows]
        return counts, costs
