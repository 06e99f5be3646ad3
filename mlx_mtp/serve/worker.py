"""The one thread that owns MLX and the engine: it admits requests between rounds, runs the
rounds, and hands each request the text its row committed. Finished conversations are kept
(bounded in bytes): a request whose token ids start with those of a kept conversation
continues it and reads only its new ids."""

import asyncio
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import List, NamedTuple, Optional, Tuple

from mlx_lm.utils import common_prefix_len

from ..checkpoints.pair import Pair
from ..engine.rows import PromptCache
from ..engine.scheduler import Engine
from ..images import image_spans
from ..request import GenerationRequest, ThoughtText
from ..tools import ToolCallText
from .follower import AddRow, DropKept, FinishRow, send_plan
from .protocol import BadRequest, Settings

logger = logging.getLogger(__name__)


class Delta(NamedTuple):
    """What a step added to one reply."""

    text: str  # the answer's new text
    finish: Optional[str]  # the finish reason, or None while the row goes on
    tokens: int  # completion tokens so far
    stats: object  # the row's Stats
    logprobs: Optional[list]  # per new token (id, log-prob, [(id, log-prob)] of the top ones), or None
    thought: str = ""  # the thinking's new text (chat, where the template has a thinking channel)
    calls: tuple = ()  # tool calls completed in this step (chat with tools), in OpenAI's form


@dataclass
class Job:
    """One request as the worker sees it; `events` carries its updates to the handler."""

    request: GenerationRequest  # all of the prompt, also what a kept conversation has
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: str = ""  # the request's, for log lines
    row: object = None
    cancelled: bool = False  # set by the handler: the worker drops the row at its next step
    settings: dict = field(default_factory=dict)  # the request's settings, for the other ranks
    echo: Optional[str] = None  # the prompt's text, which the reply starts with (completions' echo)
    prompt_only: bool = False  # echo with max_tokens 0: the one token the row commits is left out
    thoughts: Optional[ThoughtText] = None  # splits a chat reply's thinking from its answer
    tools: Optional[ToolCallText] = None  # splits a chat reply's tool calls from its answer

    def leave(self):
        """The client is gone: drop the row, and end `updates` now."""
        self.cancelled = True
        self.events.put_nowait(("gone",))

    async def updates(self):
        """Deltas as the row commits; raises the worker's BadRequest; ends early if the
        client left. With `echo` the first starts with the prompt: its text, and its ids (the
        first with log-prob and top None)."""
        tokens, first = 0, True
        while True:
            event = await self.events.get()
            if event[0] == "gone":
                return
            if event[0] == "error":
                raise event[1]
            _, new, text, finish, stats, scores, prompt_scores = event
            if self.prompt_only:
                new, text, finish, scores = [], "", "length", None if scores is None else []
            tokens += len(new)
            logprobs = None if scores is None else [(t, lp, top) for t, (lp, top) in zip(new, scores)]
            if first and self.echo is not None:
                text = self.echo + text
                if logprobs is not None:
                    prompt = self.request.prompt
                    logprobs = [(prompt[0], None, None)] + [
                        (t, lp, top) for t, (lp, top) in zip(prompt[1:], prompt_scores)] + logprobs
            first = False
            thought, calls = "", ()
            if self.thoughts is not None:
                thought, text = self.thoughts.feed(text, final=finish is not None)
            if self.tools is not None:
                text, calls = self.tools.feed(text, final=finish is not None)
                if finish == "stop" and self.tools.count:
                    finish = "tool_calls"
            yield Delta(text, finish, tokens, stats, logprobs, thought, tuple(calls))
            if finish:
                return


class Conversations:
    """Kept conversations, least recently used first, within `max_bytes` of target cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.kept: "OrderedDict[int, PromptCache]" = OrderedDict()

    def take(self, ids: List[int], images: Tuple[Tuple[int, int, str], ...] = ()) -> Optional[PromptCache]:
        """The kept conversation sharing the longest prefix with `ids` and their `images`
        (spans, as `PromptCache.images`: two images have the same ids), rolled back to that
        prefix (the sliding layers allowing) so that at least one id is left to read."""
        best, best_len = None, 0
        for key, conv in self.kept.items():
            n = common_prefix_len(conv.tokens, ids)
            # Up to the first image one of the two has and the other has not, at the same place.
            n = min([n] + [span[0] for span in set(conv.images) ^ set(images) if span[0] < n])
            if n > best_len:
                best, best_len = key, n
        if best is None:
            return None
        conv = self.kept[best]
        if not conv.rewind(min(best_len, len(ids) - 1)):
            return None
        del self.kept[best]
        return conv

    def keep(self, conv: PromptCache) -> List[int]:
        """Keep a conversation; returns the keys of those dropped to make room."""
        self.kept[id(conv)] = conv
        self.kept.move_to_end(id(conv))
        dropped = []
        while sum(c.nbytes for c in self.kept.values()) > self.max_bytes and self.kept:
            dropped.append(self.kept.popitem(last=False)[0])
        return dropped


class Worker:
    """The one thread that touches MLX (the main thread: MLX streams belong to the thread that
    made them): admits jobs, steps the engine, publishes updates. Past `max_batch` live rows,
    jobs wait in a queue of `max_queue`; past that, `submit` refuses them."""

    def __init__(self, pair: Pair, settings: Settings):
        self.pair = pair
        self.engine = Engine(pair, max_batch=settings.max_batch, prefill_step_size=settings.prefill_step_size)
        self.max_batch, self.max_queue = settings.max_batch, settings.max_queue
        self.inbox: "queue.Queue[Job]" = queue.Queue()
        self.jobs: List[Job] = []  # admitted to the engine
        self.conversations = Conversations(settings.cache_bytes)
        self.lock = threading.Lock()  # guards `queued`
        self.queued = 0  # jobs submitted and not finished
        self.stopping = False
        self.pipeline = pair.target.pipeline
        self.plan: list = []  # in a pipeline: the ops done since the last step, for the other ranks

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the batch and the queue are full."""
        with self.lock:
            if self.queued >= self.max_batch + self.max_queue:
                return False
            self.queued += 1
        self.inbox.put(job)
        return True

    def run(self):
        try:
            while not self.stopping:
                self._serve_step()
        finally:
            if self.pipeline is not None:
                send_plan(self.pipeline, self.plan, stop=True)

    def _serve_step(self):
        self._admit(block=not self.engine.busy)
        for job in [j for j in self.jobs if j.cancelled]:
            row = job.row
            done = f"after {len(row.generated)} of {row.max_tokens} tokens" if row.generated else "before its first token"
            logger.info("%s cancelled: the client left %s", job.id, done)
            self._finish(job, None)
        if self.pipeline is not None:
            plan, self.plan = self.plan, []
            send_plan(self.pipeline, plan)
        if self.engine.busy:
            try:
                updates = self.engine.step()
            except Exception as e:  # a failed step changed nothing: fail its jobs, go on serving
                for job in list(self.jobs):
                    self._finish(job, e)
                return
            by_row = {id(job.row): job for job in self.jobs}
            for update in updates:
                job = by_row[id(update.row)]
                if update.finish_reason == "error":  # (the reply so far does not complete its grammar)
                    self._finish(job, RuntimeError(f"the grammar engine stopped the reply after "
                                                   f"{len(update.row.generated)} tokens: {update.row.error}"))
                    continue
                self._send(job, ("update", update.tokens, update.text, update.finish_reason, update.row.stats,
                                 update.logprobs, update.prompt_logprobs))
                if update.finish_reason:
                    self._finish(job, None)

    def _admit(self, block: bool):
        while True:
            try:
                job = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            # (a prompt whose ids are scored is read whole: a kept conversation's have no scores)
            spans = image_spans(job.request.prompt, job.request.images, self.pair.target.vision)
            kept = None if job.request.prompt_logprobs else self.conversations.take(job.request.prompt, spans)
            conv = kept or PromptCache()
            try:
                read = len(conv.tokens)  # the kept conversation has the images before it
                images = tuple(image for span, image in zip(spans, job.request.images) if span[0] >= read)
                job.row = self.engine.add(replace(job.request, prompt=job.request.prompt[read:], images=images), conv)
            except ValueError as e:
                if kept is not None:  # kept again, rolled back (which loses nothing)
                    dropped = self.conversations.keep(kept)
                    if self.pipeline is not None:
                        self.plan.append(DropKept(dropped))
                self._done(job)
                self._send(job, ("error", BadRequest(str(e))))
                continue
            self.jobs.append(job)
            if self.pipeline is not None:
                self.plan.append(AddRow(id(job), list(job.request.prompt), job.settings, list(job.request.stop),
                                        None if kept is None else id(kept), len(conv.tokens)))

    def _finish(self, job: Job, error: Optional[Exception]):
        self.engine.remove(job.row)
        self.jobs.remove(job)
        conv = job.row.conversation
        kept = bool(conv.tokens)  # (not a new conversation left before its prompt was read)
        dropped = self.conversations.keep(conv) if kept else []
        if self.pipeline is not None:
            self.plan.append(FinishRow(id(job), id(conv) if kept else None, dropped))
        self._done(job)
        if error is not None:
            self._send(job, ("error", BadRequest(f"generation failed: {error}", status=500, kind="server_error")))

    def _done(self, job: Job):
        with self.lock:
            self.queued -= 1

    @staticmethod
    def _send(job: Job, event):
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def status(self) -> dict:
        """Rows decoding, rows whose prompts are being read, and requests waiting for a
        row (read from the HTTP thread)."""
        rows, reading = len(self.engine.rows), sum(len(r.rows) for r in list(self.engine.reading))
        return {"rows": rows, "reading": reading, "queued": self.queued - rows - reading}
