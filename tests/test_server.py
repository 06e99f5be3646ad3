"""`mlx-mtp serve` as a client sees it: a real server on 127.0.0.1, the real `openai` client."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import mlx.core as mx
import openai
import pydantic
import pytest
from mlx_lm.sample_utils import make_logits_processors

import mlx_mtp
from conftest import MLX_LM_PREFILL, FIXTURES, load_pair, plain_greedy, prompt_of
from mlx_mtp.conversation import DIALOGUE_STOPS, render_dialogue
from mlx_mtp.decoding.grammar import json_grammar
from mlx_mtp.request import encode
from mlx_mtp.serve.protocol import MAX_BODY_BYTES

TARGET, DRAFTER = str(FIXTURES / "target_e2b"), str(FIXTURES / "drafter_sparse")
K = 2  # the server's fixed draft length: seeded samples are then reproducible row by row
PREFILL = 64  # the server's prefill step: a long prompt is read in many chunks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags, target=TARGET, drafter=DRAFTER):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", "serve", "--target", str(target),
               "--drafter", str(drafter), "--port", str(self.port), *map(str, flags)]
        self.stderr = tempfile.NamedTemporaryFile("w+", suffix=".log")  # a file: a pipe nobody reads fills up
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.stderr, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)
        self.model = str(target)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def idle(self, seconds: float = 20) -> dict:
        """/health once no row decodes or is read and nothing waits (or `seconds` passed)."""
        deadline = time.time() + seconds
        while any(self.health()[k] for k in ("rows", "reading", "queued")) and time.time() < deadline:
            time.sleep(0.05)
        return self.health()

    def log(self) -> str:
        return open(self.stderr.name).read()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=20)
        self.stderr.close()


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", 4, "--max-queue", 2, "--draft-tokens", K, "--prefill-step-size", PREFILL)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pair():
    return load_pair("e2b")


def solo(pair, prompt, **kwargs):
    """`generate` at the module server's prefill step: what it gives one request alone."""
    return mlx_mtp.generate(pair, prompt, prefill_step_size=PREFILL, **kwargs)


def complete(server, prompt, **kwargs):
    kwargs.setdefault("temperature", 0.0)
    return server.client.completions.create(model=TARGET, prompt=prompt, **kwargs)


def test_greedy_completion_equals_generate_with_usage_and_stats(server, pair):
    out = complete(server, "Hello world", max_tokens=16)
    expected = solo(pair, "Hello world", max_tokens=16, num_draft_tokens=K)
    assert out.choices[0].text == expected.text
    assert out.usage.prompt_tokens == len(pair.tokenizer.encode("Hello world"))
    assert out.usage.completion_tokens == len(expected.tokens) == 16
    assert out.choices[0].finish_reason == "length"
    mtp = out.model_extra["mtp"]
    assert mtp["rounds"] == expected.stats.rounds and mtp["acceptance_rate"] == expected.stats.acceptance_rate


def test_token_id_prompts_and_models_and_health(server, pair):
    ids = prompt_of(12, seed=3)
    out = complete(server, ids, max_tokens=10)
    assert out.usage.prompt_tokens == 12 and out.usage.completion_tokens == 10
    expected = solo(pair, ids, max_tokens=10, num_draft_tokens=K)
    assert out.choices[0].text == expected.text
    assert [m.id for m in server.client.models.list().data] == [TARGET]
    assert server.health()["status"] == "ok"


def test_a_prompt_longer_than_a_prefill_chunk_beside_a_short_one(server, pair):
    prompts = [prompt_of(MLX_LM_PREFILL + 300, seed=12), prompt_of(4, seed=13)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda p: complete(server, p, max_tokens=12), prompts))
    for out, p in zip(outs, prompts):
        assert out.choices[0].text == solo(pair, p, max_tokens=12, num_draft_tokens=K).text
        assert out.usage.prompt_tokens == len(p)


def test_concurrent_greedy_requests_each_equal_generate(server, pair):
    prompts = [prompt_of(n, seed=100 + n) for n in (3, 40, 9, 150, 5, 22)]
    lengths = [30, 12, 25, 18, 8, 33]
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda a: complete(server, a[0], max_tokens=a[1]), zip(prompts, lengths)))
    for out, p, n in zip(outs, prompts, lengths):
        expected = solo(pair, p, max_tokens=n, num_draft_tokens=K)
        assert expected.tokens == plain_greedy(pair.target.model, p, n, eos=pair.eos_ids)
        assert out.choices[0].text == expected.text and out.usage.completion_tokens == len(expected.tokens)


def test_seeded_samples_equal_generate_whatever_runs_beside_them(server, pair):
    jobs = [("Once upon a time", 7, 0.9), ("The weather today", 8, 1.0), ("hello", 9, 0.7)]
    noise = [prompt_of(30, seed=5), prompt_of(7, seed=6)]  # greedy neighbours of other lengths
    with ThreadPoolExecutor(5) as pool:
        neighbours = [pool.submit(complete, server, p, max_tokens=40) for p in noise]
        outs = list(pool.map(lambda j: complete(server, j[0], max_tokens=20, temperature=j[2], seed=j[1]), jobs))
        [f.result() for f in neighbours]
    for out, (prompt, seed, temp) in zip(outs, jobs):
        expected = solo(pair, prompt, max_tokens=20, temperature=temp, seed=seed, num_draft_tokens=K)
        assert out.choices[0].text == expected.text


def test_streamed_chunks_join_to_the_whole_text(server):
    messages = [{"role": "user", "content": "Write a list of colours"}]
    whole = server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=24, temperature=0)
    chunks = list(server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=24,
                                                        temperature=0, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_chat_uses_the_template_and_a_continued_conversation_reads_only_new_tokens(server, pair):
    first = [{"role": "user", "content": "Hello there"}]
    reply = server.client.chat.completions.create(model=TARGET, messages=first, max_tokens=12, temperature=0)
    templated = pair.tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert reply.choices[0].message.content == solo(pair, templated, max_tokens=12,
                                                                num_draft_tokens=K).text
    messages = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                        {"role": "user", "content": "And then?"}]
    again = server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=12, temperature=0)
    whole = pair.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert again.choices[0].message.content == solo(pair, whole, max_tokens=12, num_draft_tokens=K).text
    read = again.model_extra["mtp"]["prompt_tokens_read"]
    # The first turn's prompt is not read again (the reply is, from where its text re-encodes
    # to other ids than the ones generated: the kept conversation is rolled back to there).
    assert 0 < read <= again.usage.prompt_tokens - reply.usage.prompt_tokens


def test_a_base_target_answers_chat_as_a_dialogue_and_stops_at_the_next_turn(tmp_path):
    base = tmp_path / "base_target"
    shutil.copytree(TARGET, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]  # a checkpoint without a chat template: a base model
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    pair = mlx_mtp.load(str(base), DRAFTER)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    text = render_dialogue(messages)
    assert text.startswith("Be brief.\n\nUser: ") and text.endswith("\n\nUser: Hello\nAssistant:")
    full = solo(pair, text, max_tokens=48, num_draft_tokens=K).text
    ends = [i for i in (full.find(stop) for stop in DIALOGUE_STOPS) if i >= 0]
    server = Server("--draft-tokens", K, target=base)
    try:
        out = server.client.chat.completions.create(model=str(base), messages=messages, max_tokens=48, temperature=0)
    finally:
        server.stop()
    assert out.usage.prompt_tokens == len(encode(pair.tokenizer, text))
    assert out.choices[0].message.content == full[: min(ends, default=len(full))]
    assert out.choices[0].finish_reason == ("stop" if ends else "length")


def test_penalties_and_logit_bias_equal_generate_with_mlx_lm_processors(server, pair):
    prompt = prompt_of(10, seed=7)
    fields = {"logit_bias": {"7": 3.0, "9": -100}, "repetition_penalty": 1.5, "frequency_penalty": 0.5}
    out = complete(server, prompt, max_tokens=20, extra_body=fields)
    processors = make_logits_processors({7: 3.0, 9: -100}, repetition_penalty=1.5, frequency_penalty=0.5)
    expected = solo(pair, prompt, max_tokens=20, num_draft_tokens=K, logits_processors=processors)
    assert out.choices[0].text == expected.text
    assert expected.tokens != solo(pair, prompt, max_tokens=20, num_draft_tokens=K).tokens
    assert 9 not in expected.tokens


def test_stop_strings_end_the_text_before_them(server, pair):
    prompt = prompt_of(10, seed=11)
    text = solo(pair, prompt, max_tokens=30, num_draft_tokens=K).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    out = complete(server, prompt, max_tokens=30, stop=[stop, "never appears"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = list(complete(server, prompt, max_tokens=30, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


BAD = [
    ("completions", b"{not json", "not valid JSON"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": -0.1}, "top_p"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("completions", b'{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ("completions", b'{"prompt": "hi", "top_p": NaN}', "top_p"),
    ("completions", b'{"prompt": "hi", "min_p": NaN}', "min_p"),
    ("completions", b'{"prompt": "hi", "repetition_penalty": NaN}', "repetition_penalty"),
    ("completions", b'{"prompt": "hi", "logit_bias": {"100": NaN}}', "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"512": 1.0}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"x": 1.0}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"7": 500}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": [1, 2]}, "logit_bias"),
    ("completions", {"prompt": "hi", "repetition_penalty": -1}, "repetition_penalty"),
    ("completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "empty"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "content"),
    ("completions", {"prompt": [5] * 5000}, "context"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, "unknown model"),
    ("completions", {"prompt": [5, 10**7, 7]}, "outside the vocabulary"),
    ("completions", {"prompt": [5, -1, 7]}, "outside the vocabulary"),
    ("completions", {"prompt": [5, 2.5]}, "integers"),
    ("completions", {"prompt": "hi", "n": 0}, "'n' must be >= 1"),
    ("completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ("completions", {"prompt": "hi", "n": 5}, "'n' must be <= 4"),  # (the module server's --max-batch)
    ("completions", {"prompt": ["a"] * 7}, "7 prompts x 1 choices is over the 6 rows"),
    ("completions", {"prompt": ["a", "b"], "n": 4}, "2 prompts x 4 choices is over the 6 rows"),
    ("completions", {"prompt": ["a", [5, 10**7]]}, "outside the vocabulary"),
    ("completions", {"prompt": [[5, 6], []]}, "empty"),
    ("completions", {"prompt": [[5, 6], ["a"]]}, "integers"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ("completions", {"prompt": "hi", "draft_tokens": 17}, "'draft_tokens' must be <= 16"),
    ("completions", {"prompt": "hi", "draft_tokens": "many"}, "'draft_tokens' must be an integer"),
    ("completions", {"prompt": "hi", "echo": "yes"}, "'echo' must be true or false"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "'echo' is a field of /v1/completions"),
    ("completions", {"prompt": "hi", "stop": 5}, "stop"),
    # Not built yet: refused, never silently ignored.
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
     "function": {"name": "f", "parameters": {}}}]}, "has no tool calling"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
     "'response_format' must be"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
     "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     "cannot be compiled"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
     "json_schema": {"name": "a", "schema": [1]}}}, "'schema' is a JSON schema"),
    ("completions", {"prompt": "hi", "response_format": "json"}, "'response_format' must be"),
    # schemas past the bounds llguidance is given (its checker crashed on a long $ref chain)
    ("completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
     "$defs": {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "integer"}]} for i in range(200)},
     "$ref": "#/$defs/d0"}}}}, "more than 64 '$ref's"),
    ("completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema":
     {"const": "ab" * 40000}}}}, "over 65536 bytes"),
    ("completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema":
     json.loads('{"items": ' * 40 + '{}' + '}' * 40)}}}, "nested more than 32 deep"),
    ("completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    ("completions", b'{"prompt": ["a\\ud800b", "c"]}', "lone surrogate"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}]}', "lone surrogate"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {
     "chat_template": "{{ 'ab ' * 3000000 }}"}}, "may not replace the chat template"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "needs 'logprobs'"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "'top_logprobs' must be <= 20"),
    ("completions", {"prompt": "hi", "logprobs": -1}, "'logprobs' must be >= 0"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": NaN}',
     "'top_logprobs' must be an integer"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42",
     "tool_call_id": "a"}]}, "the id of a call earlier"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "function", "name": "f",
     "content": "42"}]}, "role 'function'"),
    ("chat/completions", {"messages": 5}, "messages"),
    ("chat/completions", {"messages": True}, "messages"),
    ("completions", {"prompt": "x" * (MAX_BODY_BYTES + 1)}, "request body is over"),
]


@pytest.mark.parametrize("path, body, message", BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, path, body, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert complete(server, "Hello world", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_disconnects_frees_its_rows(server, n):
    body = {"model": TARGET, "prompt": "Once", "max_tokens": 3000, "temperature": 0, "stream": True, "n": n}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.health()["rows"] + server.health()["reading"] == n
    deadline = time.time() + 20
    while server.health()["rows"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health() == {"status": "ok", "rows": 0, "reading": 0, "queued": 0}
    assert complete(server, "Hello world", max_tokens=3).usage.completion_tokens == 3


def test_past_the_batch_and_the_queue_requests_get_429():
    server = Server("--max-batch", 1, "--max-queue", 1, "--api-key", "secret")
    try:
        body = {"model": TARGET, "prompt": "Once", "max_tokens": 3000, "stream": True}
        headers = {"authorization": "Bearer secret"}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as first, \
                httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as second:
            assert first.status_code == second.status_code == 200
            third = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 401
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
        deadline = time.time() + 20
        while server.health()["queued"] + server.health()["rows"] and time.time() < deadline:
            time.sleep(0.1)
        assert client.completions.create(model=TARGET, prompt="hi", max_tokens=3).usage.completion_tokens == 3
    finally:
        server.stop()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft-tokens", "x"], "--draft-tokens must be auto or in 0..16"),
        (["--draft-tokens", "99"], "--draft-tokens must be auto or in 0..16"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--port", "70000"], "--port in 1..65535"),
        (["-m", "no-such-pair"], "unknown model"),
    ],
)
def test_bad_serve_flags_fail_in_one_line(flags, message):
    cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", "serve", *flags]
    if "-m" not in flags:
        cmd += ["--target", TARGET]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prefill-step-size", "0"], "'--prefill-step-size': Input should be greater than or equal to 1"),
        (["--prefill-step-size", "nan"], "'--prefill-step-size': Input should be a valid integer"),
        (["--max-tokens-cap", "-1"], "'--max-tokens-cap': Input should be greater than or equal to 1"),
        (["--max-tokens-cap", "nan"], "'--max-tokens-cap': Input should be a valid integer"),
    ],
)
def test_bad_scheduling_flags_are_usage_errors_in_one_line(flags, message):
    cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", "serve", "--target", TARGET, *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_a_port_in_use_fails_in_one_line(server):
    cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", "serve", "--target", TARGET,
           "--port", str(server.port)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1  # (after the costs line of a first run on this machine)
    assert result.stderr.splitlines()[-1] == f"error: cannot serve on 127.0.0.1:{server.port} (is the port in use?)"


def test_an_unknown_path_gets_a_404_json_error(server):
    response = httpx.get(f"{server.url}/v1/no-such-path")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_wrong_method_gets_a_405_json_error(server):
    response = httpx.get(f"{server.url}/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_address_that_does_not_resolve_fails_in_one_line():
    cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", "serve", "--target", TARGET,
           "--host", "no.such.host.invalid"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: cannot serve on no.such.host.invalid:8080 (the address cannot be resolved)"


NAN_FIELDS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "presence_penalty",
              "frequency_penalty", "repetition_penalty", "repetition_context_size", "n", "logprobs", "draft_tokens"]


@pytest.mark.parametrize("path, field", [("completions", f) for f in NAN_FIELDS + ["logit_bias"]]
                         + [("chat/completions", f) for f in NAN_FIELDS + ["logit_bias", "max_completion_tokens"]])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_every_field_get_400_with_a_request_id(server, path, field, value):
    prompt = '"messages": [{"role": "user", "content": "hi"}]' if path.startswith("chat") else '"prompt": "hi"'
    number = f'{{"100": {value}}}' if field == "logit_bias" else value
    body = f'{{{prompt}, "{field}": {number}}}'.encode()
    response = httpx.post(f"{server.url}/v1/{path}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and ("finite" in error["message"] or "integer" in error["message"])
    rid = response.headers["x-request-id"]
    deadline = time.time() + 5
    while rid not in server.log() and time.time() < deadline:
        time.sleep(0.05)
    assert f"{rid} POST /v1/{path} -> 400: {error['message']}" in server.log()


@pytest.mark.parametrize("n", [1, 3])
def test_a_non_streaming_client_that_gives_up_frees_its_rows_at_the_next_step(server, n):
    body = {"model": TARGET, "prompt": "Once", "max_tokens": 4000, "temperature": 0, "n": n}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    assert server.idle() == {"status": "ok", "rows": 0, "reading": 0, "queued": 0}
    left = [line for line in server.log().splitlines() if "cancelled: the client left after" in line]
    assert len(left) >= n and all(int(line.split(" after ")[1].split()[0]) < 4000 for line in left[-n:])
    assert complete(server, "Hello world", max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_leaves_while_its_long_prompt_is_read_frees_it(server, pair):
    body = {"model": TARGET, "prompt": prompt_of(4000, seed=21), "max_tokens": 5, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.1)  # (63 chunks of 64 ids take longer)
    assert server.idle() == {"status": "ok", "rows": 0, "reading": 0, "queued": 0}
    assert "cancelled: the client left before its first token" in server.log()
    # Nothing of it was kept: the same prompt again is read whole, and gives what it gives alone.
    out = complete(server, prompt_of(4000, seed=21), max_tokens=5)
    assert out.model_extra["mtp"]["prompt_tokens_read"] == 4000
    assert out.choices[0].text == solo(pair, prompt_of(4000, seed=21), max_tokens=5, num_draft_tokens=K).text


def test_streams_keep_flowing_while_a_long_prompt_is_read_and_stay_exact(server, pair):
    """Each step reads one 64-id chunk of the long prompt beside the stream's round: the
    stream commits in every step, so its chunks arrive while the prompt is read."""
    short, long = prompt_of(5, seed=22), prompt_of(3500, seed=23)
    arrivals, joined = [], []

    def stream():
        for chunk in complete(server, short, max_tokens=400, stream=True):
            arrivals.append(time.perf_counter())
            joined.append(chunk.choices[0].text)

    with ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(stream)
        while not arrivals:
            time.sleep(0.01)
        sent = time.perf_counter()
        out = pool.submit(complete, server, long, max_tokens=6).result()
        answered = time.perf_counter()
        streaming.result()
    during = [t for t in arrivals if sent < t < answered]
    assert len(during) >= 3500 // PREFILL // 2  # (a stream of 400 tokens in rounds of up to 3)
    assert "".join(joined) == solo(pair, short, max_tokens=400, num_draft_tokens=K).text
    assert out.choices[0].text == solo(pair, long, max_tokens=6, num_draft_tokens=K).text


def test_the_next_chat_turn_sent_at_once_after_a_stop_string_reads_only_new_tokens(server, pair):
    first = [{"role": "user", "content": "Tell me more"}]
    full = server.client.chat.completions.create(model=TARGET, messages=first, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    reply = server.client.chat.completions.create(model=TARGET, messages=first, max_tokens=30, temperature=0,
                                                  stop=[stop])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == text[: text.index(stop)]
    messages = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                        {"role": "user", "content": "Why?"}]
    again = server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=5, temperature=0)
    read = again.model_extra["mtp"]["prompt_tokens_read"]
    assert 0 < read <= again.usage.prompt_tokens - reply.usage.prompt_tokens


def test_a_reply_asked_for_more_than_the_cap_ends_at_the_cap():
    server = Server("--max-tokens-cap", 7)
    try:
        out = server.client.completions.create(model=TARGET, prompt="Once", max_tokens=50, temperature=0)
        assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"
        out = server.client.completions.create(model=TARGET, prompt="Once", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
    finally:
        server.stop()


def test_client_defaults_for_fields_not_built_yet_pass(server):
    reply = server.client.chat.completions.create(
        model=TARGET, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=False, n=1,
        response_format={"type": "text"}, tool_choice="none", tools=[{"type": "function",
                                                                     "function": {"name": "f", "parameters": {}}}])
    assert reply.usage.completion_tokens == 3 and reply.choices[0].logprobs is None


def test_n_choices_are_rows_of_their_own_each_as_a_request_alone(server, pair):
    greedy = complete(server, "Hello world", max_tokens=12, n=3)
    expected = solo(pair, "Hello world", max_tokens=12, num_draft_tokens=K)
    assert [c.index for c in greedy.choices] == [0, 1, 2] and {c.text for c in greedy.choices} == {expected.text}
    assert greedy.usage.completion_tokens == 3 * 12 and greedy.usage.prompt_tokens == len(pair.tokenizer.encode("Hello world"))
    sampled = complete(server, "Once upon a time", max_tokens=12, n=2, temperature=1.0, seed=7)
    alone = [solo(pair, "Once upon a time", max_tokens=12, num_draft_tokens=K, temperature=1.0, seed=s).text
             for s in (7, 8)]  # choice i is seeded seed + i
    assert [c.text for c in sampled.choices] == alone and alone[0] != alone[1]


def test_n_streamed_choices_carry_their_index_and_end_with_the_usage(server, pair):
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=10, n=2,
                                                        temperature=1.0, seed=3, stream=True))
    texts, finished = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finished[choice.index] = choice.finish_reason or finished[choice.index]
        assert chunk.usage is None
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 20 and finished == ["length", "length"]
    whole = server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=10, n=2,
                                                  temperature=1.0, seed=3)
    assert texts == [c.message.content for c in whole.choices]


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_sends_its_usage_in_a_last_chunk_of_its_own_when_asked(server, include_usage):
    chunks = list(server.client.completions.create(model=TARGET, prompt="Hello world", max_tokens=6, temperature=0,
                                                   stream=True, stream_options={"include_usage": include_usage}))
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    if include_usage:  # as OpenAI: no choices, the usage
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6 and finishing[0].usage is None
    else:  # the usage rides on the finishing chunk
        assert chunks[-1] is finishing[0] and finishing[0].usage.completion_tokens == 6


def target_logprobs(pair, prompt_ids, tokens):
    """Each token's log-probability under plain mlx-lm's forward over prompt + tokens."""
    logits = pair.target.model(mx.array([list(prompt_ids) + list(tokens)]))[0].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return [lp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_completion_logprobs_are_the_targets_own_with_drafts_on(server, pair):
    prompt = "one two three one two three one two three"
    out = complete(server, prompt, max_tokens=24, logprobs=2)
    expected = solo(pair, prompt, max_tokens=24, num_draft_tokens=K)
    assert out.model_extra["mtp"]["accepted_tokens"] > 0  # drafts were verified, and accepted
    logprobs = out.choices[0].logprobs
    reference = target_logprobs(pair, pair.tokenizer.encode(prompt), expected.tokens)
    assert logprobs.token_logprobs == pytest.approx(reference, abs=1e-3) and all(v < 0 for v in reference)
    assert logprobs.tokens == [pair.tokenizer.decode([t]) for t in expected.tokens]
    checked = 0
    for token, top, lp in zip(logprobs.tokens, logprobs.top_logprobs, logprobs.token_logprobs):
        assert 1 <= len(top) <= 2  # (fewer: two ids with one text, e.g. bytes of a character)
        if "\ufffd" not in "".join(top):  # greedy: the chosen is the top one
            assert top[token] == pytest.approx(lp) and max(top.values()) == pytest.approx(lp)
            checked += 1
    assert checked >= 8  # (of 24: the fixture vocabulary has many byte tokens)


def test_streamed_chat_logprobs_carry_the_top_alternatives_in_order(server, pair):
    messages = [{"role": "user", "content": "Tell me a story."}]
    chunks = list(server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=10, temperature=0,
                                                        logprobs=True, top_logprobs=3, stream=True))
    content = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert len(content) == 10
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and entry.logprob == pytest.approx(values[0])
        assert bytes(entry.bytes).decode() == entry.token
    whole = server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=10, temperature=0,
                                                  logprobs=True, top_logprobs=3)
    # (the second request continues the kept conversation: its prompt's KV was computed in
    # other chunks, so the last bits may differ)
    assert [e.token for e in whole.choices[0].logprobs.content] == [e.token for e in content]
    assert [e.logprob for e in whole.choices[0].logprobs.content] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = server.client.chat.completions.create(model=TARGET, messages=messages, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_several_prompts_are_choices_of_their_own_in_order(server, pair):
    prompts = [prompt_of(7, seed=50), "Hello world", prompt_of(90, seed=51)]
    out = complete(server, prompts, max_tokens=9, n=2)
    assert [c.index for c in out.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        expected = solo(pair, prompt, max_tokens=9, num_draft_tokens=K).text
        assert [out.choices[2 * p + i].text for i in range(2)] == [expected, expected]
    ids = [encode(pair.tokenizer, p) for p in prompts]
    assert out.usage.prompt_tokens == sum(map(len, ids)) and out.usage.completion_tokens == 6 * 9


def test_echo_scores_every_prompt_id_but_the_first_as_lm_eval_reads_them(server, pair):
    """lm-eval's log-likelihood request: token-id prompts, max_tokens 1, logprobs 1, echo.
    A reply carries len(prompt) + 1 entries: the prompt's (the first None) and the token."""
    prompts = [prompt_of(5, seed=52), prompt_of(PREFILL * 2 + 30, seed=53)]  # (one crosses prefill chunks)
    out = complete(server, prompts, max_tokens=1, logprobs=1, echo=True, seed=1234)
    for prompt, choice in zip(prompts, out.choices):
        token = solo(pair, prompt, max_tokens=1).tokens
        reference = target_logprobs(pair, prompt[:1], prompt[1:] + token)
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(prompt) + 1
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1:] == pytest.approx(reference, abs=1e-3)
        assert logprobs.tokens == [pair.tokenizer.decode([t]) for t in prompt + token]
        assert choice.text == pair.tokenizer.decode(prompt) + pair.tokenizer.decode(token)
    assert out.usage.completion_tokens == 2
    # a string prompt echoes as sent; max_tokens 0 scores the prompt alone
    alone = complete(server, "Hello world", max_tokens=0, logprobs=0, echo=True)
    ids = encode(pair.tokenizer, "Hello world")
    assert alone.choices[0].text == "Hello world" and alone.choices[0].finish_reason == "length"
    assert len(alone.choices[0].logprobs.token_logprobs) == len(ids) and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(target_logprobs(pair, ids[:1], ids[1:]), abs=1e-3)


def test_a_streamed_echo_starts_with_the_prompt(server, pair):
    prompt = "one two three one two three"
    chunks = list(complete(server, prompt, max_tokens=8, echo=True, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[0].choices[0].text.startswith(prompt)
    assert text == prompt + solo(pair, prompt, max_tokens=8, num_draft_tokens=K).text


class Reading(pydantic.BaseModel):
    ok: bool
    color: Literal["red", "green", "blue"]
    name: str = pydantic.Field(max_length=6)


def test_a_json_schema_reply_parses_into_the_clients_model_and_equals_the_target_alone(server, pair):
    """The openai SDK's `parse` sends a strict json_schema: the reply parses and
    validates, and is the target's own greedy output under that grammar."""
    from test_grammar import constrained_plain

    messages = [{"role": "user", "content": "Describe the reading."}]
    out = server.client.chat.completions.parse(model=TARGET, messages=messages, response_format=Reading,
                                               max_tokens=60, temperature=0)
    assert isinstance(out.choices[0].message.parsed, Reading) and out.choices[0].finish_reason == "stop"
    schema = openai.lib._pydantic.to_strict_json_schema(Reading)
    ids = chat_ids(pair, messages)
    expected = constrained_plain(pair, ids, json_grammar(schema), 60)
    assert out.choices[0].message.content == pair.tokenizer.decode([t for t in expected if t not in pair.eos_ids])
    assert out.model_extra["mtp"]["by_source"]["grammar"]["acceptance"] == 1.0


def chat_ids(pair, messages):
    from mlx_mtp.conversation import render

    return encode(pair.tokenizer, render(pair, messages))


def test_json_object_replies_stream_and_stop_at_max_tokens_with_length(server):
    body = dict(model=TARGET, messages=[{"role": "user", "content": "Give me JSON."}], temperature=0.7, seed=3,
                response_format={"type": "json_object"})
    whole = server.client.chat.completions.create(max_tokens=200, **body)
    assert whole.choices[0].finish_reason == "stop" and isinstance(json.loads(whole.choices[0].message.content), dict)
    chunks = list(server.client.chat.completions.create(max_tokens=200, stream=True, **body))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    cut = server.client.chat.completions.create(max_tokens=3, **{**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")
    completion = complete(server, "Some JSON:", max_tokens=200, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(completion.choices[0].text), dict)


def test_lm_eval_runs_a_log_likelihood_task_from_a_local_file_as_the_target_scores_it(server, pair, tmp_path,
                                                                                       monkeypatch):
    """lm-eval-harness's `local-completions` (its own request: token-id prompts, echo,
    logprobs 1, two prompts per request) on a task read from a local file: each sample's
    log-likelihood and greediness are plain mlx-lm's over the same ids."""
    import lm_eval
    import transformers
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    questions = [("The sky is", " blue and wide"), ("one two three", " one two three"), ("Hello", " world")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in questions))
    (tmp_path / "tiny.yaml").write_text(
        f"task: mlx_mtp_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{continuation}}'\nmetric_list:\n  - metric: acc\n")
    args = (f"base_url={server.url}/v1/completions,model={TARGET},tokenizer_backend=huggingface,tokenizer={TARGET},"
            "add_bos_token=True,batch_size=2")
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["mlx_mtp_tiny"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    samples = sorted(out["samples"]["mlx_mtp_tiny"], key=lambda x: x["doc_id"])
    hf = transformers.AutoTokenizer.from_pretrained(TARGET)
    assert len(samples) == len(questions)
    for (context, continuation), sample in zip(questions, samples):
        logprob, greedy = sample["resps"][0][0]
        whole, head = hf(context + continuation)["input_ids"], hf(context)["input_ids"]
        logits = pair.target.model(mx.array([whole]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        positions = range(len(head) - 1, len(whole) - 1)
        # (relative 2e-6: the sums are ~-100 here, each term within ~1e-5)
        assert logprob == pytest.approx(sum(lp[i, whole[i + 1]].item() for i in positions), rel=2e-6, abs=1e-4)
        assert greedy == all(mx.argmax(lp[i]).item() == whole[i + 1] for i in positions)


def test_a_bad_draft_tokens_names_its_field(server):
    for value in (17, -1, "many"):
        response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "draft_tokens": value})
        assert response.status_code == 400 and response.json()["error"]["param"] == "draft_tokens"


def test_a_request_turns_speculation_off_or_fixes_its_own_k(server, pair):
    prompt = "one two three one two three one two three"
    for k in (0, 4):
        out = complete(server, prompt, max_tokens=20, temperature=0.8, seed=4, extra_body={"draft_tokens": k})
        expected = solo(pair, prompt, max_tokens=20, temperature=0.8, seed=4, num_draft_tokens=k)
        assert out.choices[0].text == expected.text
        assert (out.model_extra["mtp"]["drafted_tokens"] > 0) == (k > 0)
    auto = complete(server, prompt, max_tokens=5, extra_body={"draft_tokens": "auto"})
    assert auto.usage.completion_tokens == 5
