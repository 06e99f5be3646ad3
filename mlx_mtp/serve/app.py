"""`mlx-mtp serve`: an OpenAI-compatible HTTP server on the engine.

HTTP handlers (Starlette, under uvicorn) validate, tokenize and queue; one worker thread owns
MLX and the engine: it admits requests between rounds, runs the rounds, and hands each
request the text its row committed. Concurrent requests share rounds (continuous batching
with speculative decoding); past `max_batch` live rows they wait in a bounded queue, past
that they get HTTP 429. A client that disconnects frees its row at the next step.

Conversations are kept between requests (bounded in bytes): a request whose token ids start
with those of a kept conversation continues it and reads only its new ids.

Under `mlx.launch` (a pipeline-sharded target), rank 0 serves HTTP and the other ranks
`follow`: before each step, rank 0 sends them what it did to the engine and the kept
conversations since the last one (a `plan`), and they do the same to theirs.
"""

import asyncio
import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

from mlx_lm.sample_utils import make_logits_processors
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..checkpoints.pair import Pair
from ..conversation import render, stop_strings
from ..decoding.sampling import SamplingParams
from ..engine.rows import PromptCache
from ..engine.scheduler import Engine
from ..request import GenerationRequest, check_vocabulary, encode

MAX_BODY_BYTES = 4 * 1024 * 1024


class BadRequest(ValueError):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, kind="invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_response(e: BadRequest) -> JSONResponse:
    body = {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status)


@dataclass
class Job:
    """One request as the worker sees it; `events` carries its updates to the handler."""

    request: GenerationRequest  # all of the prompt, also what a kept conversation has
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    row: object = None
    cancelled: bool = False
    prompt_tokens: int = 0  # all of the prompt, also the part a kept conversation had read
    settings: dict = field(default_factory=dict)  # the request's settings, for the other ranks


class Conversations:
    """Kept conversations, least recently used first, within `max_bytes` of target cache."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.kept: "OrderedDict[int, PromptCache]" = OrderedDict()

    def take(self, ids: List[int]) -> Optional[PromptCache]:
        """The kept conversation sharing the longest prefix with `ids`, rolled back to that
        prefix (the sliding layers allowing) so that at least one id is left to read."""
        best, best_len = None, 0
        for key, conv in self.kept.items():
            n = common_prefix(conv.tokens, ids)
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


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Worker:
    """The one thread that touches MLX (the main thread: MLX streams belong to the thread that
    made them): admits jobs, steps the engine, publishes updates."""

    def __init__(self, pair: Pair, max_batch: int, max_queue: int, draft_tokens: Optional[int], cache_bytes: int):
        self.pair = pair
        self.engine = Engine(pair, max_batch=max_batch)
        self.draft_tokens = draft_tokens
        self.max_batch, self.max_queue = max_batch, max_queue
        self.inbox: "queue.Queue[Job]" = queue.Queue()
        self.jobs: List[Job] = []  # admitted to the engine
        self.conversations = Conversations(cache_bytes)
        self.lock = threading.Lock()  # guards `queued`
        self.queued = 0  # jobs submitted and not finished
        self.stopping = False
        self.pipeline = pair.target.pipeline
        self.plan: list = []  # in a pipeline: what was done since the last step, for the other ranks

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
                self._publish(stop=True)

    def _serve_step(self):
        self._admit(block=not self.engine.busy)
        for job in [j for j in self.jobs if j.cancelled]:
            self._finish(job, None)
        if self.pipeline is not None:
            self._publish()
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
                self._send(job, ("update", update.tokens, update.text, update.finish_reason, update.row.stats))
                if update.finish_reason:
                    self._finish(job, None)

    def _publish(self, stop: bool = False):
        """Send the plan to the other ranks (an empty one too: they step when rank 0 does)."""
        plan, self.plan = self.plan, []
        self.pipeline.share_json({"ops": plan, "stop": stop} if plan or stop else None)

    def _admit(self, block: bool):
        while True:
            try:
                job = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            kept = self.conversations.take(job.request.prompt)
            conv = kept or PromptCache()
            try:
                job.row = self.engine.add(job.request.with_prompt(job.request.prompt[len(conv.tokens):]), conv)
            except ValueError as e:
                if kept is not None:  # kept again, rolled back (which loses nothing)
                    dropped = self.conversations.keep(kept)
                    if self.pipeline is not None:
                        self.plan.append(["drop", dropped])
                self._done(job)
                self._send(job, ("error", BadRequest(str(e))))
                continue
            self.jobs.append(job)
            if self.pipeline is not None:
                taken = None if kept is None else (id(kept), len(kept.tokens))
                self.plan.append(["add", id(job), list(job.request.prompt), job.settings, taken, job.request.stop])

    def _finish(self, job: Job, error: Optional[Exception]):
        self.engine.remove(job.row)
        self.jobs.remove(job)
        dropped = self.conversations.keep(job.row.conversation)
        if self.pipeline is not None:
            self.plan.append(["finish", id(job), id(job.row.conversation), dropped])
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
        """Rows decoding, and requests waiting for one (read from the HTTP thread)."""
        rows = len(self.engine.rows)
        return {"rows": rows, "queued": self.queued - rows}


def follow(pair: Pair, max_batch: int, draft_tokens: Optional[int]):
    """A rank other than 0 of a pipeline-sharded server: do what rank 0 did, step when it
    steps, until it stops."""
    engine = Engine(pair, max_batch=max_batch)
    context = pair.target.max_positions
    rows, kept = {}, {}  # rank 0's job -> row; rank 0's key -> kept conversation
    while True:
        plan = pair.target.pipeline.share_json() or {"ops": [], "stop": False}
        for op, *args in plan["ops"]:
            if op == "add":
                job, prompt, body, taken, stops = args
                conv = PromptCache()
                if taken is not None:
                    conv = kept.pop(taken[0])
                    conv.rewind(taken[1])
                request = parse_request({**body, "stop": None}, context, pair.target.vocab_size, draft_tokens, stops)
                rows[job] = engine.add(request.with_prompt(prompt[len(conv.tokens):]), conv)
                continue
            if op == "finish":  # the row ends, its conversation is kept
                job, key, dropped = args
                row = rows.pop(job)
                engine.remove(row)
                kept[key] = row.conversation
            else:  # "drop": a failed request's conversation was kept again
                (dropped,) = args
            for k in dropped:  # ... and these dropped to make room
                kept.pop(k, None)
        if plan["stop"]:
            return
        if engine.busy:
            try:
                engine.step()
            except Exception:  # as on rank 0: the step changed nothing, its rows end (rank 0 says so)
                pass


# Requests: parsing and checking, one field at a time.

def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if low is not None and value < low:
        raise BadRequest(f"'{name}' must be >= {low}, got {value}", name)
    if high is not None and value > high:
        raise BadRequest(f"'{name}' must be <= {high}, got {value}", name)
    return kind(value)


def parse_processors(body: dict, vocab_size: int) -> list:
    """mlx-lm's logits processors from OpenAI's `logit_bias`, `presence_penalty` and
    `frequency_penalty` and mlx_lm.server's `repetition_penalty` / `repetition_context_size`."""
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise BadRequest("'logit_bias' must map token ids to numbers", "logit_bias")
    ids = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.lstrip("-").isdigit() and 0 <= int(key) < vocab_size):
            raise BadRequest(f"'logit_bias' keys must be token ids in 0..{vocab_size - 1}, got {key!r}", "logit_bias")
        ids[int(key)] = _number({"logit_bias": value}, "logit_bias", 0.0, low=-100, high=100)
    return make_logits_processors(
        ids,
        repetition_penalty=_number(body, "repetition_penalty", None, low=0),
        repetition_context_size=_number(body, "repetition_context_size", 20, int, low=1),
        presence_penalty=_number(body, "presence_penalty", None, low=-2, high=2),
        frequency_penalty=_number(body, "frequency_penalty", None, low=-2, high=2),
    )


def parse_request(body: dict, context: Optional[int], vocab_size: int, draft_tokens: Optional[int],
                  own_stops: List[str] = ()) -> GenerationRequest:
    """The request's settings (no prompt yet), checked; `own_stops`: the server's stop strings."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({param: max_tokens}, param, 256, int, low=1, high=context)
    temperature = _number(body, "temperature", 1.0, low=0)
    top_p = _number(body, "top_p", 1.0, low=0, high=1)  # 0: off, as in mlx-lm
    top_k = _number(body, "top_k", 0, int, low=0)
    min_p = _number(body, "min_p", 0.0, low=0, high=1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    if _number(body, "n", 1, int) != 1:
        raise BadRequest("only n = 1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    try:
        params = SamplingParams(temperature, top_p, top_k, min_p, parse_processors(body, vocab_size))
        return GenerationRequest((), params, max_tokens, seed if seed is None else seed % 2**32, draft_tokens,
                                 tuple(stop) + tuple(own_stops))
    except ValueError as e:
        raise BadRequest(str(e)) from None


def parse_stream(body: dict) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    return stream


def completion_prompt(pair: Pair, body: dict) -> List[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
        if pair.tokenizer is None:
            raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
        return encode(pair.tokenizer, prompt)
    if isinstance(prompt, list):
        try:
            check_vocabulary(encode(None, prompt), pair.target.vocab_size)
            return prompt
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
    raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")


def chat_prompt(pair: Pair, body: dict) -> List[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a 'role' and a 'content'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise BadRequest("only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest("each message needs a 'role' and a 'content'", "messages")
        clean.append({"role": m["role"], "content": content})
    try:
        return encode(pair.tokenizer, render(pair, clean))
    except ValueError as e:
        raise BadRequest(str(e), "messages") from None


def mtp_stats(stats) -> dict:
    return {
        "prompt_tokens_read": stats.prompt_tokens,  # the rest came from a kept conversation
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "rounds": stats.rounds,
        "by_source": stats.by_source,
        "generation_tps": stats.generation_tps,
    }


def build_app(pair: Pair, worker: Worker, model_name: str, api_key: Optional[str] = None) -> Starlette:
    context = pair.target.max_positions
    created = int(time.time())

    def check_auth(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise BadRequest("invalid API key", status=401, kind="authentication_error")

    async def read_json(request: Request) -> dict:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("the request body must be a JSON object")
        if data.get("model") not in (None, model_name):
            raise BadRequest(f"unknown model {data.get('model')!r}; this server has {model_name!r}", "model")
        return data

    async def generate(request: Request, chat: bool):
        try:
            check_auth(request)
            body = await read_json(request)
            # a base target's chat reply ends where it starts the next turn
            settings = parse_request(body, context, pair.target.vocab_size, worker.draft_tokens,
                                     stop_strings(pair) if chat else [])
            stream_reply = parse_stream(body)
            ids = chat_prompt(pair, body) if chat else completion_prompt(pair, body)
            if context and len(ids) >= context:
                raise BadRequest(f"the prompt has {len(ids)} tokens but the context is {context}", "messages" if chat else "prompt")
        except BadRequest as e:
            return error_response(e)
        loop = asyncio.get_running_loop()
        job = Job(settings.with_prompt(ids), loop, asyncio.Queue(), prompt_tokens=len(ids),
                  settings={k: v for k, v in body.items() if k not in ("messages", "prompt")})
        if not worker.submit(job):
            return error_response(BadRequest("too many requests: the batch and the queue are full, retry later",
                                             status=429, kind="rate_limit_error"))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"

        def choice(text, finish, delta: bool):
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        def envelope(choices, stream: bool, **extra):
            obj = kind + (".chunk" if stream and chat else "")
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices, **extra}

        async def events():
            """(text, finish_reason, completion tokens, stats) as the row commits; raises BadRequest."""
            tokens = 0
            while True:
                event = await job.events.get()
                if event[0] == "error":
                    raise event[1]
                _, new, text, finish, stats = event
                finish = "length" if finish == "context" else finish  # OpenAI's name for both limits
                tokens += len(new)
                yield text, finish, tokens, stats
                if finish:
                    return

        def usage(tokens):
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": tokens,
                    "total_tokens": job.prompt_tokens + tokens}

        if not stream_reply:
            parts = []
            try:
                async for text, finish, tokens, stats in events():
                    parts.append(text)
            except BadRequest as e:
                return error_response(e)
            finally:
                job.cancelled = True  # the handler is gone (done, or the client left)
            return JSONResponse(envelope([choice("".join(parts), finish, False)], False, usage=usage(tokens),
                                         mtp=mtp_stats(stats)))

        async def stream():
            try:
                async for text, finish, tokens, stats in events():
                    extra = {"usage": usage(tokens), "mtp": mtp_stats(stats)} if finish else {}
                    yield {"data": json.dumps(envelope([choice(text, finish, True)], True, **extra))}
                yield {"data": "[DONE]"}
            except BadRequest as e:
                yield {"data": json.dumps({"error": {"message": str(e), "type": e.kind, "param": None}})}
            finally:
                job.cancelled = True  # a client that disconnects frees its row at the next step

        return EventSourceResponse(stream(), ping=600)

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def models(request: Request):
        try:
            check_auth(request)
        except BadRequest as e:
            return error_response(e)
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "mlx-mtp"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", **worker.status()})

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


def serve(pair: Pair, model_name: str, host: str, port: int, max_batch: int, max_queue: int,
          draft_tokens: Optional[int], api_key: Optional[str], cache_mb: int, on_ready=None):
    """Serve until interrupted: HTTP in a thread of its own, the engine in this one. In a
    pipeline, only rank 0 serves; the other ranks follow it."""
    import uvicorn

    if pair.target.pipeline is not None and not pair.target.pipeline.last:
        return follow(pair, max_batch, draft_tokens)

    worker = Worker(pair, max_batch, max_queue, draft_tokens, cache_mb * 1024 * 1024)
    app = build_app(pair, worker, model_name, api_key)
    # uvicorn logs nothing: errors reach the user as one line of ours.
    config = uvicorn.Config(app, host=host, port=port, log_level="critical", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, daemon=True, name="http")
    http.start()
    while not server.started:
        if not http.is_alive():
            raise OSError(f"cannot serve on {host}:{port} (is the port in use?)")
        time.sleep(0.05)
    if on_ready is not None:
        on_ready()
    try:
        worker.run()
    finally:
        server.should_exit = True
        http.join(timeout=5)
