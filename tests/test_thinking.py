"""Thinking: where the chat template has a thinking channel, the thought goes to
`reasoning_content` (and `delta.reasoning_content`), the answer to `content`;
`chat_template_kwargs` reach the template; `mlx-mtp chat` shows the thought apart.

The fixture is the e2b target with two of its tokens renamed `<think>` and `</think>` (how
mlx-lm's TokenizerWrapper recognizes a thinking channel) and a template that opens a
thought when `enable_thinking` is set, as thinking models' templates do."""

import io
import json
import shutil

import pytest
from mlx_lm.sample_utils import make_logits_processors
from rich.console import Console
from rich.control import strip_control_codes

import mlx_mtp
from mlx_mtp.request import ThoughtText
from test_server import DRAFTER, TARGET, Server

K = 2
START, END = "<think>", "</think>"
BIAS = 7.0  # on </think>: the random fixture ends its thought once, after ~20 tokens


@pytest.fixture(scope="module")
def thinking_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinking") / "target"
    shutil.copytree(TARGET, path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    renamed = {"<audio_soft_token>": START, "<video_soft_token>": END}
    vocab = tokenizer["model"]["vocab"]
    for old, new in renamed.items():
        vocab[new] = vocab.pop(old)
    for added in tokenizer["added_tokens"]:
        if added["content"] in renamed:
            added["content"], added["special"] = renamed[added["content"]], False
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in renamed]
    config["chat_template"] += "{% if add_generation_prompt and enable_thinking %}<think>{% endif %}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def pair(thinking_target):
    return mlx_mtp.load(str(thinking_target), DRAFTER)


def reference(pair, messages, thinking: bool, max_tokens: int):
    """The library's reply to the rendered conversation, and where its thought ends."""
    from mlx_mtp.conversation import render

    text = render(pair, messages, {"enable_thinking": thinking})
    assert text.endswith(START) == thinking
    end = pair.tokenizer.convert_tokens_to_ids(END)
    processors = make_logits_processors({end: BIAS})
    return mlx_mtp.generate(pair, text, max_tokens=max_tokens, num_draft_tokens=K, logits_processors=processors).text


def test_the_thought_splits_at_the_markers_whatever_the_chunks():
    text = "I should add. 2+2=4</think>The answer is 4.<think>again</think> done"
    for size in (1, 2, 3, 7, len(text)):
        splitter, thought, answer = ThoughtText(START, END, "prompt<think>"), [], []
        for i in range(0, len(text), size):
            t, a = splitter.feed(text[i : i + size], final=i + size >= len(text))
            thought.append(t)
            answer.append(a)
        assert "".join(thought) == "I should add. 2+2=4again" and "".join(answer) == "The answer is 4. done"
    assert ThoughtText(START, END, "no thought opened").feed("plain </think> text", True) == ("", "plain </think> text")
    assert ThoughtText(START, END, "a <think> closed </think> here").feed("x", True) == ("", "x")


def test_a_thought_goes_to_reasoning_content_streamed_or_not(thinking_target, pair):
    messages = [{"role": "user", "content": "What is two and two?"}]
    text = reference(pair, messages, True, 40)
    assert END in text  # (the bias ends the thought within the reply)
    thought, answer = text.split(END, 1)
    server = Server("--draft-tokens", K, target=thinking_target)
    try:
        body = dict(model=str(thinking_target), messages=messages, max_tokens=40, temperature=0,
                    logit_bias={str(pair.tokenizer.convert_tokens_to_ids(END)): BIAS},
                    extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        out = server.client.chat.completions.create(**body)
        message = out.choices[0].message
        assert message.model_extra["reasoning_content"] == thought and message.content == answer
        chunks = list(server.client.chat.completions.create(stream=True, **body))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thought
        assert "".join(d.content or "" for d in deltas) == answer
        # thinking off: the template opens no thought, and everything is the answer
        off = server.client.chat.completions.create(**{**body, "extra_body": {
            "chat_template_kwargs": {"enable_thinking": False}}})
        assert off.choices[0].message.content == reference(pair, messages, False, 40)
        assert "reasoning_content" not in off.choices[0].message.model_extra
        bad = server.client.chat.completions.with_raw_response.create
        with pytest.raises(Exception, match="chat_template_kwargs"):
            bad(**{**body, "extra_body": {"chat_template_kwargs": ["enable_thinking"]}})
    finally:
        server.stop()


def test_chat_shows_the_thought_apart_from_the_answer(pair):
    """The terminal chat's display (thinking on by default, as mlx-lm's wrapper sets it):
    the thought, a blank line, the answer."""
    from mlx_mtp.cli.chat import stream_reply
    from mlx_mtp.conversation import Conversation

    question = "What is two and two?"
    thought, _, answer = reference(pair, [{"role": "user", "content": question}], True, 40).partition(END)
    assert answer
    screen = io.StringIO()
    end = pair.tokenizer.convert_tokens_to_ids(END)
    stream_reply(Conversation(pair), question, Console(file=screen, highlight=False, soft_wrap=True), False,
                 max_tokens=40, num_draft_tokens=K, logits_processors=make_logits_processors({end: BIAS}))
    # (rich drops control codes from the dimmed thought; the answer is written as it comes)
    assert screen.getvalue().startswith(strip_control_codes(thought) + "\n\n" + answer + "\n")
