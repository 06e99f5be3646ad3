"""`mlx-mtp serve`: an OpenAI-compatible HTTP server on the engine.

HTTP handlers (Starlette, under uvicorn) parse and check requests (`protocol`), tokenize and
queue them; one worker thread owns MLX and the engine (`worker`). Concurrent requests share
rounds (continuous batching with speculative decoding); past `max_batch` live rows they wait
in a bounded queue, past that they get HTTP 429. A client that disconnects frees its row at
the next step. Under `mlx.launch` (a pipeline-sharded target), rank 0 serves HTTP and the
other ranks follow it (`follower`).
"""

import asyncio
import errno
import functools
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import replace
from typing import List, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..checkpoints.pair import Pair
from ..conversation import stop_strings
from ..engine.stats import Stats
from ..request import ThoughtText
from .follower import follow
from ..tools import ToolCallText
from .protocol import (BadRequest, Reply, Settings, chat_prompt, check_grammar_runs, completion_prompts, parse_body,
                       parse_echo, parse_n, parse_request, parse_stream, parse_tools)
from .worker import Delta, Job, Worker

logger = logging.getLogger(__name__)


def request_id(request: Request) -> str:
    if not hasattr(request.state, "id"):
        request.state.id = uuid.uuid4().hex
    return request.state.id


def error_response(request: Request, e: BadRequest, headers: Optional[dict] = None) -> JSONResponse:
    """An error in OpenAI's shape, logged with the request's id."""
    rid = request_id(request)
    where = f"{rid} {request.method} {request.url.path} -> {e.status}"
    if e.status >= 500:
        logger.error("%s: %s", where, e, exc_info=e.__cause__)
    else:
        logger.warning("%s: %s", where, e)
    return JSONResponse(e.body(), status_code=e.status, headers={**(headers or {}), "x-request-id": rid})


async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
    return error_response(request, e)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Routing's errors (no such path, a method the path does not take) in OpenAI's shape."""
    return error_response(request, BadRequest(f"{e.detail}: {request.method} {request.url.path}",
                                              status=e.status_code), e.headers)


async def server_error(request: Request, e: Exception) -> JSONResponse:
    """Anything else is a bug: its traceback goes to the log, not to the client."""
    error = BadRequest("internal server error", status=500, kind="server_error")
    error.__cause__ = e
    return error_response(request, error)


class RequireKey:
    """'Authorization: Bearer KEY' on every path but /health (health probes carry no key)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and \
                Headers(scope=scope).get("authorization") != f"Bearer {self.key}":
            error = BadRequest("invalid API key", status=401, kind="authentication_error")
            return await error_response(Request(scope), error)(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(pair: Pair, worker: Worker, model_name: str, settings: Settings) -> Starlette:
    context = pair.target.max_positions
    created = int(time.time())

    def prepare(raw: bytes, chat: bool):
        """From the body: a Job's worth of settings per choice (request, echoed text, prompt
        only), the number of prompt ids, whether to stream and to send the usage in a chunk
        of its own, and the settings for the other ranks (parsing, template, tokenizer: CPU
        work, run off the event loop)."""
        body = parse_body(raw, model_name)
        echo, prompt_only = parse_echo(body, chat)
        # a base target's chat reply ends where it starts the next turn
        request = parse_request(body, context, pair.target.vocab_size, settings,
                                stop_strings(pair) if chat else [], echo)
        n, (stream, usage_apart) = parse_n(body, settings), parse_stream(body)
        rendered, tools, call = None, None, None
        if chat:
            tools, call = parse_tools(pair, body)  # (call: the grammar of a required or named call)
            if call is not None and request.grammar is not None:
                raise BadRequest("a required or named tool call and 'response_format' cannot both be asked for",
                                 "tool_choice")
            ids, rendered, images = chat_prompt(pair, body, tools, settings)
            request = replace(request, images=images, grammar=request.grammar if call is None else call(rendered))
            prompts = [(ids, None)]
        elif body.get("tools") or body.get("tool_choice"):
            raise BadRequest("'tools' and 'tool_choice' are fields of chat completions", "tools")
        else:
            prompts = completion_prompts(pair, body, n, settings.max_batch + settings.max_queue)
        choices = []
        for ids, text in prompts:
            if context and len(ids) >= context:
                raise BadRequest(f"the prompt has {len(ids)} tokens but the context is {context}",
                                 "messages" if chat else "prompt")
            shown = (text if text is not None else pair.tokenizer.decode(ids)) if echo else None
            for i in range(n):  # a row per choice; choice i of a seeded request is seeded seed + i
                seed = None if request.seed is None else (request.seed + i) % 2**32
                choices.append((replace(request, prompt=tuple(ids), seed=seed), shown, prompt_only))
        if request.grammar is not None:
            check_grammar_runs(pair, request.grammar, "response_format" if call is None else "tool_choice")
        body = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        return choices, prompt_tokens, stream, usage_apart or len(choices) > 1, body, rendered, tools

    async def generate(request: Request, chat: bool):
        rid = request_id(request)
        choices, prompt_tokens, stream, usage_apart, body, rendered, tools = await run_in_threadpool(
            prepare, await request.body(), chat)
        loop, jobs = asyncio.get_running_loop(), []
        for one, shown, prompt_only in choices:
            thoughts = ThoughtText.of(pair.tokenizer, rendered) if chat else None
            jobs.append(Job(one, loop, asyncio.Queue(), rid, settings={**body, "seed": one.seed}, echo=shown,
                            prompt_only=prompt_only, thoughts=thoughts,
                            tools=ToolCallText(pair.tokenizer, tools) if tools else None))
            if not worker.submit(jobs[-1]):
                for job in jobs[:-1]:
                    job.leave()
                raise BadRequest("too many requests: the batch and the queue are full, retry later",
                                 status=429, kind="rate_limit_error")
        reply = Reply(chat, model_name, prompt_tokens, rid, token_text=lambda t: pair.tokenizer.decode([t]))
        headers = {"x-request-id": rid}
        if stream:  # (sse-starlette ends the stream, and so the jobs, when the client leaves)
            return EventSourceResponse(chunks(jobs, reply, usage_apart), ping=600, headers=headers)
        watch = asyncio.ensure_future(leave_on_disconnect(request, jobs))
        try:
            results = await asyncio.gather(*(whole(job) for job in jobs))
        finally:
            for job in jobs:
                job.cancelled = True  # the handler is gone (done, or the client left)
            watch.cancel()
        if any(c.finish is None for c in results):  # the client left: nobody reads this
            return Response(status_code=499)
        tokens, stats = sum(c.tokens for c in results), Stats.pooled([c.stats for c in results])
        return JSONResponse(reply.whole([(c.text, c.finish, c.logprobs, c.thought, c.calls) for c in results],
                                        tokens, stats),
                            headers=headers)

    async def models(request: Request):
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "mlx-mtp"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", **worker.status()})

    return Starlette(
        routes=[
            Route("/v1/completions", functools.partial(generate, chat=False), methods=["POST"]),
            Route("/v1/chat/completions", functools.partial(generate, chat=True), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        middleware=[Middleware(RequireKey, key=settings.api_key)] if settings.api_key else [],
        exception_handlers={BadRequest: bad_request, HTTPException: http_error, Exception: server_error},
    )


async def leave_on_disconnect(request: Request, jobs: List[Job]):
    """A non-streaming request's client may leave while its rows decode: its body is read,
    so the next message uvicorn delivers is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.leave()


async def whole(job: Job) -> Delta:
    """One choice's deltas joined; finish None if the client left."""
    parts, thought, finish, tokens, stats, logprobs, calls = [], [], None, 0, None, None, ()
    async for delta in job.updates():
        parts.append(delta.text)
        thought.append(delta.thought)
        finish, tokens, stats, calls = delta.finish, delta.tokens, delta.stats, calls + delta.calls
        logprobs = None if delta.logprobs is None else (logprobs or []) + delta.logprobs
    return Delta("".join(parts), finish, tokens, stats, logprobs, "".join(thought), calls)


async def chunks(jobs: List[Job], reply: Reply, usage_apart: bool):
    """A streamed reply's server-sent events: each choice's chunks as its row commits (with
    its index); the usage and stats in a chunk of their own once every choice finished
    (`usage_apart`, as OpenAI's include_usage), else in the last chunk of the one choice."""
    merged = asyncio.Queue()

    async def pump(index: int, job: Job):
        try:
            async for update in job.updates():
                await merged.put((index, update))
        except BadRequest as e:
            await merged.put((index, e))
        finally:
            await merged.put((index, None))  # this choice is over

    pumps = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    totals, stats, open_choices = [0] * len(jobs), [None] * len(jobs), len(jobs)
    try:
        while open_choices:
            index, update = await merged.get()
            if update is None:
                open_choices -= 1
                continue
            if isinstance(update, BadRequest):  # the response has started: the error is the last event
                yield {"data": json.dumps({"error": {"message": str(update), "type": update.kind, "param": None}})}
                return
            totals[index], stats[index] = update.tokens, update.stats
            if update.finish and not usage_apart:
                yield {"data": json.dumps(reply.chunk(update.text, update.finish, index, totals[index], stats[index],
                                                      update.logprobs, update.thought, update.calls))}
            else:
                yield {"data": json.dumps(reply.chunk(update.text, update.finish, index, logprobs=update.logprobs,
                                                      thought=update.thought, calls=update.calls))}
        if any(s is None for s in stats):  # (a choice ended without a token: its client left)
            return
        if usage_apart:
            yield {"data": json.dumps(reply.usage_chunk(sum(totals), Stats.pooled(stats)))}
        yield {"data": "[DONE]"}
    finally:
        for job, task in zip(jobs, pumps):
            job.cancelled = True  # a client that disconnects frees its rows at the next step
            task.cancel()


def listen(host: str, port: int) -> List[socket.socket]:
    """Sockets on every address `host` resolves to, bound as uvicorn (asyncio) binds them;
    bound here because uvicorn only logs why it cannot, and we say it in one line."""
    where = f"cannot serve on {host}:{port}"
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise OSError(f"{where} (the address cannot be resolved)") from None
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sockets.append(socket.socket(family, kind, proto))
            sockets[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # IPv4 has its own socket
                sockets[-1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sockets[-1].bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        reasons = {errno.EADDRINUSE: "is the port in use?", errno.EADDRNOTAVAIL: "the address is not this machine's"}
        raise OSError(f"{where} ({reasons.get(e.errno, e.strerror)})") from None
    return sockets


def serve(pair: Pair, model_name: str, host: str, port: int, settings: Settings, on_ready=None):
    """Serve until interrupted: HTTP in a thread of its own, the engine in this one. In a
    pipeline, only rank 0 serves; the other ranks follow it."""
    import uvicorn

    if pair.target.pipeline is not None and not pair.target.pipeline.last:
        return follow(pair, settings)

    sockets = listen(host, port)
    log = logging.getLogger("mlx_mtp.serve")
    if not log.handlers:  # error replies and cancelled requests, one line each, on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    worker = Worker(pair, settings)
    app = build_app(pair, worker, model_name, settings)
    # uvicorn logs nothing: startup errors reach the user as one line of ours (`listen`),
    # each error reply as a log line of `error_response`.
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1))
    http = threading.Thread(target=server.run, args=(sockets,), daemon=True, name="http")
    http.start()
    while not server.started:
        if not http.is_alive():
            raise RuntimeError("the HTTP server stopped while starting")
        time.sleep(0.05)
    if on_ready is not None:
        on_ready()
    try:
        worker.run()
    finally:
        server.should_exit = True
        http.join(timeout=5)
