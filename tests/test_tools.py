"""Tool calling: `tools` reach the chat template, calls come back as `tool_calls` (streamed
as `delta.tool_calls`), tool results go back through the template, and `tool_choice`
"required" or a named function is a grammar of the template's call syntax, so that the
call equals what the target alone gives under that grammar, and parses.

The fixtures are the e2b target with a tool-calling template, as mlx-lm recognizes one:
- gemma4: six of its special tokens renamed Gemma 4's `<|tool_call>`, `<tool_call|>`,
  `<|"|>`, ... and a template that writes calls and results as Gemma 4's does; the end of a
  call's turn, `<|tool_response>`, is an EOS id, as in Gemma 4's generation config.
- json_tools: a template that writes `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
  (Qwen's and others'), its markers plain text."""

import json
import shutil

import llguidance
import pytest
from mlx_lm.sample_utils import make_logits_processors

import mlx_mtp
from mlx_mtp.conversation import render
from mlx_mtp.decoding.grammar import grammar_tokenizer
from mlx_mtp.request import encode
from mlx_mtp.tools import ToolCallText, call_grammar
from test_grammar import constrained_plain
from test_server import DRAFTER, TARGET, Server

GEMMA_TOKENS = {"<start_of_image>": "<|tool>", "<end_of_image>": "<tool|>", "<start_of_audio>": "<|tool_call>",
                "<end_of_audio>": "<tool_call|>", "<audio_soft_token>": '<|"|>',
                "<video_soft_token>": "<|tool_response>"}
GEMMA_TEMPLATE = """
{%- macro value(v) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is mapping -%}{ {%- for k, x in v | dictsort -%}{{ k }}:{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%} }
{%- elif v is sequence -%}[ {%- for x in v -%}{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%} ]
{%- else -%}{{ v }}{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- if tools -%}<start_of_turn>system
{% for tool in tools %}<|tool>declaration:{{ tool.function.name }}{{ tool.function | tojson }}<tool|>{% endfor %}<end_of_turn>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'tool' -%}<|tool_response>response:{{ message.name }}{value:{{ value(message.content) }}}<tool_response|>
{% else -%}<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}
{% for call in message.tool_calls or [] %}<|tool_call>call:{{ call.function.name }}{{ value(call.function.arguments) }}<tool_call|>{% endfor %}{{ (message.content or '') | trim }}<end_of_turn>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{% endif -%}
"""
JSON_TEMPLATE = """
{{- bos_token -}}
{%- if tools -%}<start_of_turn>system
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<end_of_turn>
{% endif -%}
{%- for message in messages -%}<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}
{% for tool_call in message.tool_calls or [] %}{% set tool_call = tool_call.function %}<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}{{ (message.content or '') | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{% endif -%}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "detail": {"type": "object", "properties": {"wind": {"type": "boolean"},
                                                    "hours": {"type": "array", "items": {"enum": [6, 12, 18]},
                                                              "maxItems": 2}},
                   "required": ["wind"]}},
        "required": ["city", "unit", "detail"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
K = 2


def tool_target(tmp_path_factory, template: str, tokens: dict, eos: list):
    path = tmp_path_factory.mktemp("tools") / "target"
    shutil.copytree(TARGET, path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for old, new in tokens.items():
        vocab[new] = vocab.pop(old)
    for added in tokenizer["added_tokens"]:
        added["content"] = tokens.get(added["content"], added["content"])
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [tokens.get(t, t) for t in config["additional_special_tokens"]]
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": eos}))
    return path


@pytest.fixture(scope="module")
def gemma_target(tmp_path_factory):
    return tool_target(tmp_path_factory, GEMMA_TEMPLATE, GEMMA_TOKENS, [1, 5, 12])  # 12: <|tool_response>


@pytest.fixture(scope="module")
def json_target(tmp_path_factory):
    return tool_target(tmp_path_factory, JSON_TEMPLATE, {}, [1, 5])


@pytest.fixture(scope="module")
def gemma(gemma_target):
    return mlx_mtp.load(str(gemma_target), DRAFTER)


@pytest.fixture(scope="module")
def server(gemma_target):
    s = Server("--draft-tokens", K, target=gemma_target)
    yield s
    s.stop()


def prompt_ids(pair, messages, tools):
    return encode(pair.tokenizer, render(pair, messages, None, tools))


def reference_call(pair, messages, tools, chosen, several, max_tokens=80):
    """The target alone (plain mlx-lm) under the call grammar: its text between the markers,
    as mlx-lm's own parser reads it."""
    prompt = prompt_ids(pair, messages, tools)
    tokens = constrained_plain(pair, prompt, call_grammar(pair.tokenizer, chosen, several), max_tokens)
    text = pair.tokenizer.decode([t for t in tokens if t not in pair.eos_ids])
    start, end = pair.tokenizer.tool_call_start, pair.tokenizer.tool_call_end
    assert text.startswith(start) and text.endswith(end) and tokens[-1] in pair.eos_ids
    return [pair.tokenizer.tool_parser(call, tools) for call in text[len(start):-len(end)].split(end + start)]


def arguments(calls) -> list:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_calls_split_from_the_text_at_the_markers_whatever_the_chunks(gemma):
    text = ('Let me look. <|tool_call>call:get_time{zone:<|"|>utc<|"|>}<tool_call|>'
            '<|tool_call>call:get_weather{city:<|"|>Oslo, {x}<|"|>,detail:{wind:true},unit:<|"|>celsius<|"|>}'
            '<tool_call|> then <|tool_call>not a call<tool_call|> and <|tool_call>call:cut{a:')
    for size in (1, 2, 5, 13, len(text)):
        splitter, content, calls = ToolCallText(gemma.tokenizer, TOOLS), [], []
        for i in range(0, len(text), size):
            shown, done = splitter.feed(text[i:i + size], final=i + size >= len(text))
            content.append(shown)
            calls += done
        # what does not parse stays in the content, markers and all; a call cut short too
        assert "".join(content) == ("Let me look.  then <|tool_call>not a call<tool_call|> and "
                                    "<|tool_call>call:cut{a:")
        assert [c["index"] for c in calls] == [0, 1] and len({c["id"] for c in calls}) == 2
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_time", {"zone": "utc"}),
            ("get_weather", {"city": "Oslo, {x}", "detail": {"wind": True}, "unit": "celsius"})]


@pytest.mark.parametrize("form", ["gemma4", "json_tools"])
def test_the_call_grammar_takes_the_templates_own_calls_and_refuses_bad_ones(gemma, json_target, form):
    pair = gemma if form == "gemma4" else mlx_mtp.load(str(json_target), DRAFTER)
    tokenizer = pair.tokenizer
    lltokenizer = grammar_tokenizer(tokenizer, pair.target.vocab_size, pair.eos_ids)
    grammar = call_grammar(tokenizer, TOOLS, several=True)

    def takes(arguments: dict, name="get_weather") -> bool:
        call = {"id": "c", "type": "function", "function": {"name": name, "arguments": arguments}}
        text = render(pair, QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]}])
        text = text[text.index(tokenizer.tool_call_start):text.index(tokenizer.tool_call_end)]
        matcher = llguidance.LLMatcher(lltokenizer, grammar)
        ids = tokenizer.encode(text + tokenizer.tool_call_end, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.consume_token(max(pair.eos_ids))

    good = {"city": "Paris", "unit": "celsius", "days": 3, "detail": {"wind": False, "hours": [6, 12]}}
    assert takes(good) and takes({**good, "days": -2}) and takes({"zone": "cet"}, "get_time")
    assert takes({k: v for k, v in good.items() if k != "days"})  # (an optional key)
    assert not takes({k: v for k, v in good.items() if k != "unit"})  # a required key left out
    assert not takes({**good, "unit": "kelvin"})  # outside the enum
    assert not takes({**good, "city": "Paris, France"})  # past maxLength
    assert not takes({**good, "days": 2.5})  # not an integer
    assert not takes({**good, "detail": {"hours": [6]}})  # a nested required key left out
    assert not takes({**good, "detail": {"wind": True, "hours": [6, 12, 18]}})  # past maxItems
    assert not takes({"zone": "utc"}, "get_weathr")  # no such function


@pytest.mark.parametrize("k", [1, 4])
def test_a_named_call_equals_the_target_alone_under_its_grammar_streamed_or_not(server, gemma, k):
    expected = reference_call(gemma, QUESTION, TOOLS, [WEATHER], several=False)
    body = dict(model=server.model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80,
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body={"draft_tokens": k})
    out = server.client.chat.completions.create(**body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert arguments(choice.message.tool_calls) == [(c["name"], c["arguments"]) for c in expected]
    assert choice.message.tool_calls[0].type == "function" and choice.message.tool_calls[0].id.startswith("call_")
    assert out.model_extra["mtp"]["by_source"]["grammar"]["acceptance"] == 1.0  # the call's syntax, drafted surely
    chunks = list(server.client.chat.completions.create(stream=True, **body))
    streamed = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert arguments(streamed) == arguments(choice.message.tool_calls) and streamed[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""


def test_required_calls_one_of_the_tools_and_parses(server, gemma):
    expected = reference_call(gemma, QUESTION, TOOLS, TOOLS, several=False)
    out = server.client.chat.completions.create(model=server.model, messages=QUESTION, tools=TOOLS,
                                                tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                max_tokens=80)
    assert arguments(out.choices[0].message.tool_calls) == [(c["name"], c["arguments"]) for c in expected]


def test_a_tool_round_trip_through_the_openai_sdk(server, gemma):
    """Call, result, answer: the result goes back through the template (named after its
    call), and the answer is the target's greedy reply to that conversation."""
    client = server.client
    first = client.chat.completions.create(model=server.model, messages=QUESTION, tools=TOOLS, temperature=0,
                                           max_tokens=80, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = QUESTION + [first.choices[0].message,  # (the SDK's own message object, as its docs append it)
                           {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=24)
    seen = QUESTION + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                        "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "sunny, 21 C"}]
    text = render(gemma, seen, None, TOOLS)
    assert '<|tool_response>response:get_weather{value:<|"|>sunny, 21 C<|"|>}' in text
    expected = mlx_mtp.generate(gemma, text, max_tokens=24, num_draft_tokens=K)
    assert answer.choices[0].message.content == expected.text and answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens == len(prompt_ids(gemma, seen, TOOLS))


def test_auto_leaves_the_reply_to_the_model_and_keeps_what_does_not_parse(server, gemma):
    """With "auto" the model is free: the reply is its plain greedy text. Pushed to open a
    call it cannot write (the random fixture), the text stays content, markers and all."""
    for bias in ({}, {"9": 30.0}):  # 9: <|tool_call>
        out = server.client.chat.completions.create(model=server.model, messages=QUESTION, tools=TOOLS,
                                                    temperature=0, max_tokens=20, logit_bias=bias)
        expected = mlx_mtp.generate(gemma, prompt_ids(gemma, QUESTION, TOOLS), max_tokens=20, num_draft_tokens=K,
                                    logits_processors=make_logits_processors({9: 30.0}) if bias else None)
        assert out.choices[0].message.content == expected.text and out.choices[0].message.tool_calls is None
        assert ("<|tool_call>" in expected.text) == bool(bias)
    none = server.client.chat.completions.create(model=server.model, messages=QUESTION, tools=TOOLS,
                                                 tool_choice="none", temperature=0, max_tokens=20)
    assert none.choices[0].message.content == mlx_mtp.generate(
        gemma, prompt_ids(gemma, QUESTION, None), max_tokens=20, num_draft_tokens=K).text  # no tools declared


def test_the_json_format_required_call_parses_against_the_schema(json_target):
    server = Server("--draft-tokens", K, target=json_target)
    try:
        out = server.client.chat.completions.create(model=server.model, messages=QUESTION, tools=TOOLS,
                                                    tool_choice="required", parallel_tool_calls=False,
                                                    temperature=0, max_tokens=120)
        (name, args), = arguments(out.choices[0].message.tool_calls)
        assert out.choices[0].finish_reason == "tool_calls"
        if name == "get_weather":
            assert args["unit"] in ("celsius", "fahrenheit") and len(args["city"]) <= 8
            assert isinstance(args["detail"]["wind"], bool)
        else:
            assert name == "get_time" and args["zone"] in ("utc", "cet")
    finally:
        server.stop()


def call(id="call_1", arguments='{"zone": "utc"}'):
    return {"id": id, "type": "function", "function": {"name": "get_time", "arguments": arguments}}


BAD = [
    ({"tools": {"type": "function"}}, "tools", "must be a list"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "letters, digits"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "each tool must be"),
    ({"tools": [TIME, TIME]}, "tools", "same name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", "JSON schema"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "naming one of"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "naming one of"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot both"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a-b": {"type": "string"}}, "required": ["a-b"]}}}],
      "tool_choice": "required"}, "tool_choice", "parameter name 'a-b'"),
    ({"messages": QUESTION + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages",
     "id of a call earlier"),
    ({"messages": QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call(arguments="{oops")]}]},
     "messages", "not a JSON object"),
    ({"messages": QUESTION + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]}, "messages",
     "needs an 'id' and a 'function'"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [call()]}]}, "messages", "on an assistant"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "JSON schema of an object"),
    ({"messages": QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call()]},
                              {"role": "tool", "tool_call_id": ["call_1"], "content": "x"}]}, "messages",
     "id of a call earlier"),  # (an unhashable id)
    ({"messages": QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call(arguments='{"a": NaN}')]}]},
     "messages", "not a JSON object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"c": {"const": 'say <|"|> here'}}, "required": ["c"]}}}],
      "tool_choice": "required"}, "tool_choice", "special token"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "minLength": 100000}}, "required": ["s"]}}}],
      "tool_choice": "required"}, "tool_choice", "cannot be compiled"),  # (only the matcher finds it)
]


@pytest.mark.parametrize("change, param, message", BAD)
def test_bad_tool_requests_get_400_and_the_server_keeps_serving(server, change, param, message):
    body = {"model": server.model, "messages": QUESTION, "max_tokens": 4, **change}
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert server.client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=2).choices


def test_a_template_without_tool_calling_refuses_tools_and_tool_messages():
    server = Server("--draft-tokens", K)
    try:
        for change, param in [({"tools": TOOLS}, "tools"),
                              ({"messages": QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call()]},
                                                        {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
                                "messages")]:
            response = server.post("/v1/chat/completions", {"model": server.model, "messages": QUESTION, **change})
            assert response.status_code == 400 and response.json()["error"]["param"] == param
            assert "has no tool calling" in response.json()["error"]["message"]
        response = server.post("/v1/completions", {"model": server.model, "prompt": "hi", "tools": TOOLS})
        assert response.status_code == 400 and "fields of chat completions" in response.json()["error"]["message"]
    finally:
        server.stop()


def named(parameters: dict) -> list:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


@pytest.mark.parametrize("form", ["gemma4", "json_tools"])
def test_call_grammars_of_schemas_clients_send(gemma, json_target, form):
    """maxItems 0 and 1, numbers that parse to finite values, a subschema met under several
    types built once, $defs (pydantic's nested models), no keys beyond the declared ones."""
    pair = gemma if form == "gemma4" else mlx_mtp.load(str(json_target), DRAFTER)
    tokenizer = pair.tokenizer
    lltokenizer = grammar_tokenizer(tokenizer, pair.target.vocab_size, pair.eos_ids)

    def takes(tools, arguments: dict) -> bool:
        grammar = call_grammar(tokenizer, tools, several=False)
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        text = render(pair, QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]}], tools=tools)
        text = text[text.index(tokenizer.tool_call_start):text.index(tokenizer.tool_call_end)]
        matcher = llguidance.LLMatcher(lltokenizer, grammar)
        ids = tokenizer.encode(text + tokenizer.tool_call_end, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.consume_token(max(pair.eos_ids))

    for most in (0, 1):
        tools = named({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"},
                                                               "maxItems": most}}, "required": ["xs"]})
        assert takes(tools, {"xs": [7] * most}) and not takes(tools, {"xs": [7] * (most + 1)})
    number = named({"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]})
    assert takes(number, {"n": 2.5e10}) and takes(number, {"n": -3})
    if form == "gemma4":  # (llguidance's own JSON numbers in the other format)
        assert not takes(number, {"n": float("1e300")})  # written 1e+300: past the exponent's two digits
    deep = {"type": "integer"}
    for _ in range(10):  # 4^10 copies if each type rebuilt the subschema
        deep = {"type": ["array", "array", "array", "array"], "items": deep}
    assert len(call_grammar(tokenizer, named({"type": "object", "properties": {"a": deep}, "required": ["a"]}),
                            several=False)) < 20000
    if form == "json_tools":
        defs = named({"type": "object", "$defs": {"P": {"enum": [7, 8]}}, "properties": {"p": {"$ref": "#/$defs/P"}},
                      "required": ["p"]})
        assert takes(defs, {"p": 7}) and not takes(defs, {"p": 9})
        assert not takes(number, {"n": 1, "extra": 2})  # closed where the schema does not say


def test_a_parsed_call_with_an_infinite_number_stays_text(gemma):
    splitter = ToolCallText(gemma.tokenizer, TOOLS)
    content, calls = splitter.feed("<|tool_call>call:get_time{zone:1e999}<tool_call|>", final=True)
    assert calls == [] and "1e999" in content


THINK = {"<audio_soft_token>": "<think>", "<video_soft_token>": "</think>"}


@pytest.fixture(scope="module")
def thinking_tools_target(tmp_path_factory):
    """The JSON tool format with a thinking channel (`<think>` ... `</think>`, opened by the
    template when `enable_thinking` is set, as in test_thinking)."""
    template = JSON_TEMPLATE + "{% if add_generation_prompt and enable_thinking %}<think>{% endif %}"
    path = tool_target(tmp_path_factory, template, THINK, [1, 5])
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    for added in tokenizer["added_tokens"]:
        if added["content"] in THINK.values():
            added["special"] = False
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in THINK.values()]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_a_required_call_may_come_after_a_thought(thinking_tools_target):
    pair = mlx_mtp.load(str(thinking_tools_target), DRAFTER)
    tokenizer = pair.tokenizer
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    lltokenizer = grammar_tokenizer(tokenizer, pair.target.vocab_size, pair.eos_ids)
    call_text = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>'

    def takes(thought, text) -> bool:
        matcher = llguidance.LLMatcher(lltokenizer, call_grammar(tokenizer, [TIME], False, thought))
        ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.consume_token(max(pair.eos_ids))

    # the prompt opened a thought: it ends (empty or not), then the call
    assert takes(True, "so, the zone</think>" + call_text) and takes(True, "</think>" + call_text)
    assert not takes(True, call_text)
    # no thought opened: a whole one, or none
    assert takes(False, call_text) and takes(False, "<think>hmm</think>" + call_text)
    assert not takes(False, "hmm" + call_text)

    server = Server("--draft-tokens", K, target=thinking_tools_target)
    try:
        end = tokenizer.convert_tokens_to_ids("</think>")
        out = server.client.chat.completions.create(
            model=server.model, messages=QUESTION, tools=[TIME], tool_choice="required", parallel_tool_calls=False,
            temperature=0,
            max_tokens=150, logit_bias={str(end): 7.0}, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.model_extra["reasoning_content"]
        (name, args), = arguments(message.tool_calls)
        assert name == "get_time" and args["zone"] in ("utc", "cet")
    finally:
        server.stop()
