"""OpenAI's API as the server speaks it: requests parsed and checked one field at a time,
and the shapes of the replies. Nothing here touches HTTP or MLX."""

import base64
import binascii
import json
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from mlx_lm.sample_utils import make_logits_processors

from ..checkpoints.pair import Pair
from ..conversation import render
from ..decoding.grammar import Constraint, grammar_tokenizer, json_grammar
from ..decoding.sampling import SamplingParams
from ..images import MAX_IMAGE_BYTES, Image, check_count, read_bytes
from ..models.cache import MAX_DRAFT_TOKENS
from ..tools import call_format, call_grammar
from ..request import MAX_TOP_LOGPROBS, GenerationRequest, ThoughtText, check_vocabulary, encode

MAX_BODY_BYTES = 32 * 1024 * 1024  # (an image as a data URL is 4/3 of its bytes)
MAX_TOKENS_CAP = 8192  # the default bound on one reply, when the context is longer
MAX_MESSAGE = 500  # characters of an error message


@dataclass(frozen=True)
class Settings:
    """What the operator set (`mlx-mtp serve`'s flags), the same on every rank."""

    max_batch: int = 8  # rows decoded together
    max_queue: int = 32  # requests waiting for a row; past it, HTTP 429
    draft_tokens: Optional[int] = None  # K of every round, or None: chosen each round
    cache_bytes: int = 1 << 30  # target cache of kept conversations
    prefill_step_size: Optional[int] = None  # None: the engine's measured default
    max_tokens_cap: Optional[int] = None  # None: MAX_TOKENS_CAP or the context, the smaller
    api_key: Optional[str] = None
    image_dir: Optional[str] = None  # image_url parts may name files under it (None: no files)
    remote_images: bool = False  # image_url parts may be http(s) URLs the server fetches

    def cap(self, context: Optional[int]) -> int:
        """The most tokens one reply may have."""
        if self.max_tokens_cap is not None:
            return self.max_tokens_cap
        return min(MAX_TOKENS_CAP, context) if context else MAX_TOKENS_CAP


class BadRequest(ValueError):
    """A request the server refuses: OpenAI's error body with an HTTP status."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, kind="invalid_request_error"):
        if len(message) > MAX_MESSAGE:  # (it may quote what the client sent: a whole data URL, say)
            message = message[: MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


# Requests.

def parse_body(raw: bytes, model_name: str) -> dict:
    """The request body as a JSON object, for this server's model."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:  # (nested deeper than the parser goes)
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"unknown model {body.get('model')!r}; this server has {model_name!r}", "model")
    return body


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if not math.isfinite(value):  # JSON bodies may carry NaN and Infinity
        raise BadRequest(f"'{name}' must be a finite number, got {value}", name)
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


def refuse_unsupported(body: dict):
    """Fields this server cannot honour, when set to ask for something: a clear 400, never
    a reply that silently ignores them."""
    asks = {
        "functions": bool(body.get("functions")),  # (the API's old form of tools)
        "function_call": body.get("function_call") not in (None, "none", "auto"),
        "suffix": body.get("suffix") not in (None, ""),
        "best_of": body.get("best_of") not in (None, 1),
    }
    for name, asked in asks.items():
        if asked:
            raise BadRequest(f"'{name}' is not supported by this server", name)


def parse_request(body: dict, context: Optional[int], vocab_size: int, settings: Settings,
                  own_stops: List[str] = (), echo: bool = False) -> GenerationRequest:
    """The request's settings (no prompt yet), checked; `own_stops`: the server's stop
    strings. A reply asked for more tokens than the server's cap ends at the cap ("length").
    With `echo` (see `parse_echo`) logprobs cover the prompt too, and `max_tokens` may be 0
    (the row then reads the prompt and commits one token that the reply leaves out)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({param: max_tokens}, param, 256, int, low=0 if echo else 1, high=context)
    max_tokens = min(max(max_tokens, 1), settings.cap(context))
    temperature = _number(body, "temperature", 1.0, low=0)
    top_p = _number(body, "top_p", 1.0, low=0, high=1)  # 0: off, as in mlx-lm
    top_k = _number(body, "top_k", 0, int, low=0)
    min_p = _number(body, "min_p", 0.0, low=0, high=1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("'seed' must be an integer", "seed")
    refuse_unsupported(body)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    processors = parse_processors(body, vocab_size)
    logprobs = parse_logprobs(body)
    grammar = parse_response_format(body)
    draft_tokens = parse_draft_tokens(body, settings)
    try:
        params = SamplingParams(temperature, top_p, top_k, min_p, processors)
        return GenerationRequest((), params, max_tokens, seed if seed is None else seed % 2**32,
                                 draft_tokens, tuple(stop) + tuple(own_stops), logprobs=logprobs,
                                 prompt_logprobs=echo and logprobs is not None, grammar=grammar)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def parse_logprobs(body: dict) -> Optional[int]:
    """Top alternatives to report with each token's log-probability, or None: chat's
    `logprobs: true` with `top_logprobs`, or the completions' `logprobs: N`."""
    logprobs = body.get("logprobs")
    if logprobs is None or logprobs is False:
        if body.get("top_logprobs"):
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    if logprobs is True:
        return _number(body, "top_logprobs", 0, int, low=0, high=MAX_TOP_LOGPROBS)
    return _number(body, "logprobs", 0, int, low=0, high=MAX_TOP_LOGPROBS)


def parse_draft_tokens(body: dict, settings: Settings) -> Optional[int]:
    """K of this request's rounds (mlx-mtp's own field `draft_tokens`: 0 turns speculation
    off, "auto" chooses K each round), or the server's `--draft-tokens`."""
    value = body.get("draft_tokens")
    if value is None:
        return settings.draft_tokens
    if value == "auto":
        return None
    return _number(body, "draft_tokens", None, int, low=0, high=MAX_DRAFT_TOKENS)


def parse_response_format(body: dict) -> Optional[str]:
    """The grammar a reply must follow, or None: `response_format` `{"type": "json_object"}`
    (any JSON object) or `{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}` (a JSON value of that schema; without one, any JSON object)."""
    form = body.get("response_format")
    if form is None:
        return None
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar()
    if kind != "json_schema":
        raise BadRequest("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                         "{\"type\": \"json_schema\", \"json_schema\": {...}}", "response_format")
    spec = form.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise BadRequest("'response_format.json_schema' must be an object whose 'schema' is a JSON schema",
                         "response_format")
    try:
        return json_grammar(spec.get("schema"))
    except ValueError as e:
        raise BadRequest(str(e), "response_format") from None


def check_grammar_runs(pair: Pair, grammar: str, param: str):
    """A 400 if the grammar library cannot run this grammar with the pair's tokenizer (the
    first check builds the library's view of the tokenizer: about a second)."""
    try:
        if pair.tokenizer is None:
            raise ValueError("structured output needs the target's tokenizer")
        Constraint(grammar, grammar_tokenizer(pair.tokenizer, pair.target.vocab_size, pair.eos_ids))
    except ValueError as e:
        raise BadRequest(str(e), param) from None


MAX_TOOLS = 128  # as OpenAI
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def parse_tools(pair: Pair, body: dict) -> Tuple[Optional[List[dict]], Optional[Callable[[str], str]]]:
    """The functions the template declares (None: no tools, or `tool_choice: "none"`) and,
    for a call the reply must make (`tool_choice` "required": of one of them, a named
    function: of that one), its grammar given the rendered prompt (None: the model chooses,
    "auto"). Where the template has a thinking channel, the grammar lets the model think
    first (and end a thought the prompt opened)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise BadRequest("'tool_choice' needs 'tools'", "tool_choice")
        return None, None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadRequest(f"'tools' must be a list of up to {MAX_TOOLS} functions", "tools")
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not TOOL_NAME.fullmatch(function["name"]):
            raise BadRequest("each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}} with a name "
                             "of letters, digits, '_' and '-' (at most 64)", "tools")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object" \
                or not isinstance(function.get("description", ""), str):
            raise BadRequest(f"tool {function['name']!r}: 'parameters' must be a JSON schema of an object "
                             "(its arguments, by name) and 'description' a string", "tools")
        names.append(function["name"])
    if len(set(names)) < len(names):
        raise BadRequest("two tools have the same name", "tools")
    several = body.get("parallel_tool_calls")
    several = True if several is None else several
    if not isinstance(several, bool):
        raise BadRequest("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if choice == "none":  # (the template is not shown them)
        return None, None
    if call_format(pair.tokenizer) is None:
        raise BadRequest(f"the chat template of {pair.name or 'this model'} has no tool calling", "tools")
    if choice in (None, "auto"):
        return tools, None
    if choice == "required":
        chosen = tools
    else:
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict) else None
        if name not in names:
            raise BadRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                             "\"function\": {\"name\": ...}} naming one of 'tools'", "tool_choice")
        chosen, several = [tools[names.index(name)]], False

    def grammar(rendered: str) -> str:
        thoughts = ThoughtText.of(pair.tokenizer, rendered)
        try:
            return call_grammar(pair.tokenizer, chosen, several, None if thoughts is None else thoughts.thinking)
        except ValueError as e:
            raise BadRequest(str(e), "tool_choice") from None

    grammar("")  # (a schema it cannot express: a 400 before the template runs)
    return tools, grammar


def parse_echo(body: dict, chat: bool) -> Tuple[bool, bool]:
    """Whether a completion starts with its prompt (`echo`: its text, and with `logprobs`
    each prompt id's, the first having none), and whether it is the prompt alone
    (`max_tokens: 0`, which scores a prompt)."""
    echo = body.get("echo")
    if echo is None or echo is False:
        return False, False
    if echo is not True:
        raise BadRequest("'echo' must be true or false", "echo")
    if chat:
        raise BadRequest("'echo' is a field of /v1/completions, not of chat completions", "echo")
    return True, body.get("max_completion_tokens", body.get("max_tokens")) == 0


def parse_n(body: dict, settings: Settings) -> int:
    """How many choices: each a row of its own (seeded seed + i when a seed is given), at
    most a batch's worth."""
    return _number(body, "n", 1, int, low=1, high=settings.max_batch)


def parse_stream(body: dict) -> Tuple[bool, bool]:
    """Whether to stream, and whether the usage comes in a chunk of its own at the end
    (`stream_options: {"include_usage": true}`)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(usage, bool):
        raise BadRequest("'stream_options' must be an object with 'include_usage' true or false", "stream_options")
    return stream, usage


def completion_prompts(pair: Pair, body: dict, n: int, most: int) -> List[Tuple[List[int], Optional[str]]]:
    """Each prompt's ids and its text (None if sent as ids): `prompt` is a string, a list of
    token ids, or a list of either (several prompts, a choice each, as OpenAI); prompts x
    `n` choices may not pass `most` rows (checked before any prompt is tokenized)."""
    prompt = body.get("prompt")
    several = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    prompts = prompt if several else [prompt]
    if len(prompts) * n > most:
        raise BadRequest(f"{len(prompts)} prompts x {n} choices is over the {most} rows this server takes at once",
                         "prompt")
    return [completion_prompt(pair, p) for p in prompts]


def completion_prompt(pair: Pair, prompt) -> Tuple[List[int], Optional[str]]:
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
        if pair.tokenizer is None:
            raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
        try:
            return encode(pair.tokenizer, prompt), prompt
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
    if isinstance(prompt, list):
        try:
            check_vocabulary(encode(None, prompt), pair.target.vocab_size)
            return prompt, None
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
    raise BadRequest("'prompt' must be a string, a list of token ids, or a list of either", "prompt")


def chat_prompt(pair: Pair, body: dict, tools: Optional[List[dict]] = None,
                settings: Settings = Settings()) -> Tuple[List[int], str, Tuple[Image, ...]]:
    """The conversation's ids (its images' soft tokens placed), its text as rendered (through
    the chat template with the request's `chat_template_kwargs`, e.g. `{"enable_thinking":
    true}`, and its `tools`), and its images."""
    options = body.get("chat_template_kwargs") or {}
    if not isinstance(options, dict):
        raise BadRequest("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    if "chat_template" in options:  # a client's own Jinja template: arbitrary CPU work on the server
        raise BadRequest("'chat_template_kwargs' may not replace the chat template", "chat_template_kwargs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    asked = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    try:  # (before any is decoded: all of them, also those a kept conversation has)
        check_count(asked, pair.target.vision, pair.name or "this model")
    except ValueError as e:
        raise BadRequest(str(e), "messages") from None
    clean, calls, images = [], {}, []  # calls: tool call id -> the function's name
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a 'role' and a 'content'", "messages")
        if m["role"] == "function":
            raise BadRequest("role 'function' (the API's old form of tool results) is not supported: "
                             "send role 'tool'", "messages")
        message = {"role": m["role"], "content": message_content(m, pair, settings, images)}
        if m.get("tool_calls") is not None:
            message["tool_calls"] = tool_calls_of(m, calls)
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id"), str) or m["tool_call_id"] not in calls:
                raise BadRequest("a tool message's 'tool_call_id' must be the id of a call earlier in 'messages'",
                                 "messages")
            message.update(tool_call_id=m["tool_call_id"], name=calls[m["tool_call_id"]])
        clean.append(message)
    if calls and call_format(pair.tokenizer) is None:
        raise BadRequest(f"the chat template of {pair.name or 'this model'} has no tool calling", "messages")
    try:
        text = render(pair, clean, options, tools)
        ids = encode(pair.tokenizer, text)
        if images:
            ids = pair.target.vision.placed(ids, images)
        return ids, text, tuple(images)
    except ValueError as e:
        raise BadRequest(str(e), "messages") from None


def message_content(m: dict, pair: Pair, settings: Settings, images: list):
    """A message's content for the template: a string, its text parts joined (an assistant's
    that only calls tools may have none), or, with images (appended to `images`), its parts."""
    content = m.get("content")
    if content is None and m["role"] == "assistant" and m.get("tool_calls"):
        return ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in ("text", "image_url") for p in content):
            raise BadRequest("content parts must be of type 'text' or 'image_url'", "messages")
        if not all(isinstance(p.get("text"), str) for p in content if p["type"] == "text"):
            raise BadRequest("a text content part needs a string 'text'", "messages")
        if all(p["type"] == "text" for p in content):
            return "".join(p["text"] for p in content)
        if m["role"] != "user":
            raise BadRequest("images go in user messages", "messages")
        parts = []
        for p in content:
            if p["type"] == "text":
                parts.append({"type": "text", "text": p["text"]})
            else:
                images.append(image_of(p.get("image_url"), pair, settings))
                parts.append({"type": "image"})
        return parts
    if not isinstance(content, str):
        raise BadRequest("each message needs a 'role' and a 'content'", "messages")
    return content


def image_of(part, pair: Pair, settings: Settings) -> Image:
    """An `image_url` part's image: a base64 data URL; a file under the server's --image-dir
    (a path or file:// URL); an http(s) URL only if the server was started with
    --allow-remote-images (else a local server would fetch what any client asks)."""
    url = part.get("url") if isinstance(part, dict) else None
    if not isinstance(url, str) or not url:
        raise BadRequest("an image_url part needs {'url': ...}", "messages")
    if len(url) > 2 * MAX_IMAGE_BYTES:
        raise BadRequest(f"the image URL is over {2 * MAX_IMAGE_BYTES} characters", "messages")
    scheme = url[:8].lower()
    try:
        if scheme.startswith("data:"):
            data = data_url_bytes(url)
        elif scheme.startswith(("http://", "https://")):
            if not settings.remote_images:
                raise BadRequest("this server fetches no image URLs (start it with --allow-remote-images): "
                                 "send the image as a data URL", "messages")
            data = fetch_image(url)
        else:
            path = local_image(url, settings)
            try:
                data = read_bytes(path)
            except ValueError as e:  # named as the client named it, not by the server's directory
                raise BadRequest(str(e).replace(str(path), url), "messages") from None
        return pair.target.vision.prepare(data)
    except ValueError as e:  # ImageError (whose text names the file as the client did)
        raise BadRequest(str(e), "messages") from None


def data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise BadRequest("a data URL image must be base64 (data:image/png;base64,...)", "messages")
    payload = "".join(payload.split())  # (line-wrapped base64)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except binascii.Error:
        raise BadRequest("the data URL's base64 is not valid", "messages") from None


MAX_PATH = 1024  # characters of an image file's name in a request


def local_image(url: str, settings: Settings) -> Path:
    """A file named by a path or file:// URL, if it lies under the server's --image-dir."""
    if settings.image_dir is None:
        raise BadRequest("this server reads no image files (start it with --image-dir DIR): "
                         "send the image as a data URL", "messages")
    if len(url) > MAX_PATH or "\0" in url:
        raise BadRequest("an image_url must be a data URL, an http(s) URL or a file name", "messages")
    name = url
    if url[:7].lower() == "file://":
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise BadRequest("a file:// image URL must name a local file", "messages")
        name = urllib.parse.unquote(parsed.path)
    root = Path(settings.image_dir).resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise BadRequest("image files must lie under the server's --image-dir", "messages")
    return path


# Remote images fetched at once: each may take up to FETCH_SECONDS, on the server's threads.
FETCHING = threading.BoundedSemaphore(4)
FETCH_SECONDS = 10


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError("redirected to a URL that is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str) -> bytes:
    """At most MAX_IMAGE_BYTES, within FETCH_SECONDS in all (not per read)."""
    if not FETCHING.acquire(timeout=FETCH_SECONDS):
        raise BadRequest("too many image URLs are being fetched: retry later", "messages", status=429,
                         kind="rate_limit_error")
    try:
        deadline = time.monotonic() + FETCH_SECONDS
        opener = urllib.request.build_opener(_HttpOnlyRedirects)
        data = bytearray()
        with opener.open(url, timeout=FETCH_SECONDS) as response:
            while len(data) <= MAX_IMAGE_BYTES:
                if time.monotonic() > deadline:
                    raise BadRequest(f"the image took over {FETCH_SECONDS} s to fetch", "messages")
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                data += chunk
    except (OSError, ValueError) as e:
        raise BadRequest(f"cannot fetch the image: {' '.join(str(e).split())}", "messages") from None
    finally:
        FETCHING.release()
    if len(data) > MAX_IMAGE_BYTES:
        raise BadRequest(f"the image at that URL is over {MAX_IMAGE_BYTES} bytes", "messages")
    return bytes(data)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def tool_calls_of(m: dict, calls: dict) -> List[dict]:
    """An assistant message's tool calls as templates read them (arguments as an object),
    their ids noted in `calls` for the tool results that follow."""
    if m["role"] != "assistant" or not isinstance(m["tool_calls"], list):
        raise BadRequest("'tool_calls' must be a list, on an assistant message", "messages")
    out = []
    for call in m["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(call.get("id"), str) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise BadRequest("each tool call needs an 'id' and a 'function' with a 'name' and its 'arguments' "
                             "(a JSON string)", "messages")
        try:
            arguments = json.loads(function["arguments"], parse_constant=_no_constant)
        except (ValueError, RecursionError):
            arguments = None
        if not isinstance(arguments, dict):
            raise BadRequest(f"the arguments of tool call {call['id']!r} are not a JSON object", "messages")
        calls[call["id"]] = function["name"]
        out.append({"id": call["id"], "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


# Replies.

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


@dataclass
class Reply:
    """The replies to one request: a (chat) completion whole, or as the chunks of a stream."""

    chat: bool
    model: str
    prompt_tokens: int  # all of the prompt, also the part a kept conversation had read
    request_id: str  # the server's id of the request, in its log lines too
    token_text: Callable[[int], str] = str  # an id's text, for logprobs
    id: str = field(init=False)

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def whole(self, choices: List[Tuple[str, str, Optional[list], str, list]], tokens: int, stats) -> dict:
        """choices: (text, finish reason, logprobs or None, thought, tool calls) of each;
        tokens: completion tokens of all."""
        return self._envelope([self._choice(text, finish, "message", i, logprobs, thought, calls)
                               for i, (text, finish, logprobs, thought, calls) in enumerate(choices)],
                              False, usage=self._usage(tokens), mtp=mtp_stats(stats))

    def chunk(self, text: str, finish: Optional[str], index: int = 0, tokens: Optional[int] = None, stats=None,
              logprobs: Optional[list] = None, thought: str = "", calls: Sequence[dict] = ()) -> dict:
        """One chunk of a stream, of choice `index` (with its new tokens' logprobs, if
        asked, its new thought and its completed tool calls); with `tokens` and `stats`
        (the last chunk of a one-choice reply) the usage and the stats too."""
        extra = {"usage": self._usage(tokens), "mtp": mtp_stats(stats)} if tokens is not None else {}
        return self._envelope([self._choice(text, finish, "delta", index, logprobs, thought, calls)], True, **extra)

    def usage_chunk(self, tokens: int, stats) -> dict:
        """After every choice of a several-choice stream finished: the usage and the stats."""
        return self._envelope([], True, usage=self._usage(tokens), mtp=mtp_stats(stats))

    def _choice(self, text, finish, key: str, index: int, logprobs: Optional[list] = None, thought: str = "",
                calls: Sequence[dict] = ()) -> dict:
        """logprobs: per token (id, log-prob, [(id, log-prob)] of the top ones), or None;
        thought: the reply's thinking, as `reasoning_content` beside `content` (chat);
        calls: tool calls (a stream's with their `index`, a message's without)."""
        finish = "length" if finish == "context" else finish  # OpenAI's name for both limits
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": self._completion_logprobs(logprobs)}
        message = {"role": "assistant", "content": None if calls and not text and key == "message" else text}
        if thought:
            message["reasoning_content"] = thought
        if calls:
            message["tool_calls"] = [c if key == "delta" else {k: v for k, v in c.items() if k != "index"}
                                     for c in calls]
        choice = {"index": index, key: message, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": [
                {**self._token(t, lp), "top_logprobs": [self._token(i, v) for i, v in top]} for t, lp, top in logprobs]}
        return choice

    def _token(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _completion_logprobs(self, logprobs: Optional[list]) -> Optional[dict]:
        """The legacy completions form: tokens, their log-probs, the top ones as {text: log-prob}
        (None for an echoed prompt's first id)."""
        if logprobs is None:
            return None
        texts = [self.token_text(t) for t, _, _ in logprobs]
        offsets = [sum(map(len, texts[:i])) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in logprobs],
                "top_logprobs": [None if top is None else {self.token_text(i): v for i, v in top}
                                 for _, _, top in logprobs],
                "text_offset": offsets}

    def _envelope(self, choices, stream: bool, **extra) -> dict:
        kind = ("chat.completion" + (".chunk" if stream else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}

    def _usage(self, tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": tokens,
                "total_tokens": self.prompt_tokens + tokens}
