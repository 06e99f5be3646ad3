"""The mlx-mtp command over the tiny fixtures: every command, its JSON, every bad input."""

import builtins
import json
import random
import re
import shutil
import signal
import string
import sys
import types

import pytest
from typer.testing import CliRunner

import mlx_mtp
from conftest import FIXTURES, load_pair
from mlx_mtp import cli
from mlx_mtp import conversation as chat
from mlx_mtp.api import GenerationResponse
from mlx_mtp.bench import runner as bench
from mlx_mtp.checkpoints import registry
from mlx_mtp.engine.stats import Stats
from mlx_mtp.request import encode
from test_registry import copy_to_hub_cache, hub_cache, toml  # noqa: F401 (fixtures)

TARGET, DRAFTER = FIXTURES / "target_e2b", FIXTURES / "drafter_sparse"
PAIR = ["--target", str(TARGET), "--drafter", str(DRAFTER)]
EOS, END_OF_TURN = 1, 5  # the fixture tokenizer's <eos> and <end_of_turn>
runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input, env={"COLUMNS": "200"})


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def generate_json(*args, input=None) -> dict:
    result = run("generate", *args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# generate


def test_generate_streams_the_text_and_a_summary_line():
    result = run("generate", "Hello world", *PAIR, "-n", 12)
    assert result.exit_code == 0, result.output
    expected = mlx_mtp.generate(load_pair("e2b"), "Hello world", max_tokens=12)
    assert result.stdout == expected.text + "\n"
    assert result.stderr.splitlines()[-1].startswith("12 tokens, ") and "acceptance" in result.stderr


def test_a_first_run_says_it_measures_costs_before_reading_the_prompt_and_only_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    first = generate_json("Hello world", *PAIR, "-n", 4)
    result = run("generate", "Hello world", *PAIR, "-n", 4)
    assert result.exit_code == 0, result.output
    assert "Measuring what forwards of this pair cost" not in result.stderr  # measured once, kept
    fresh = tmp_path / "again"
    monkeypatch.setenv("MLX_MTP_HOME", str(fresh))
    result = run("generate", "Hello world", *PAIR, "-n", 4)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Measuring what forwards of this pair cost on this machine") and len(lines) == 2
    assert (fresh / "costs.json").exists() and first["tokens"] == generate_json("Hello world", *PAIR, "-n", 4)["tokens"]


def test_generate_json_is_one_object_with_ids_and_stats():
    out = generate_json("Hello world", *PAIR, "-n", 12)
    expected = mlx_mtp.generate(load_pair("e2b"), "Hello world", max_tokens=12)
    assert out["tokens"] == expected.tokens and out["text"] == expected.text
    assert out["finish_reason"] == "length"
    stats = out["stats"]
    assert stats["generation_tokens"] == 12
    for key in ["prompt_tokens", "prompt_tps", "generation_tps", "acceptance_rate", "mean_accepted_length"]:
        assert key in stats
    assert len(stats["per_position_acceptance"]) <= load_pair("e2b").default_draft_tokens


def test_generate_gives_the_same_ids_with_and_without_drafting():
    plain = generate_json("Hello world", *PAIR, "-n", 20, "--no-draft")
    assert all(d == [] for d in plain["stats"]["drafts"])
    for k in (1, 3):
        assert generate_json("Hello world", *PAIR, "-n", 20, "--draft-tokens", k)["tokens"] == plain["tokens"]


def test_generate_reads_the_prompt_from_stdin():
    piped = generate_json("-", *PAIR, "-n", 8, input="Hello world")
    assert piped["tokens"] == generate_json("Hello world", *PAIR, "-n", 8)["tokens"]


def test_generate_chat_sends_one_templated_user_turn():
    out = generate_json("Hello world", *PAIR, "-n", 8, "--chat")
    templated = "<bos><start_of_turn>user\nHello world<end_of_turn>\n<start_of_turn>model\n"
    assert out["tokens"] == mlx_mtp.generate(load_pair("e2b"), templated, max_tokens=8).tokens


def test_generate_sampling_is_reproducible_with_a_seed():
    args = ["Hello world", *PAIR, "-n", 16, "--temp", 0.9, "--top-p", 0.95]
    assert generate_json(*args, "--seed", 3)["tokens"] == generate_json(*args, "--seed", 3)["tokens"]


def test_generate_runs_a_prompts_file_in_batches(prompts_file):
    result = run("generate", "--prompts-file", prompts_file, "--batch", 2, *PAIR, "-n", 6, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [0, 1]
    for row, text in zip(rows, ["Hello world", "Write a list of colours"]):
        assert row["tokens"] == mlx_mtp.generate(load_pair("e2b"), text, max_tokens=6).tokens
    human = run("generate", "--prompts-file", prompts_file, *PAIR, "-n", 6)
    assert human.exit_code == 0 and human.stdout.count("--- prompt ") == 2
    assert rows[1]["text"] in human.stdout and human.stderr.count("tok/s") == 1  # one summary for the file


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give either a PROMPT"),
        (["Hello", "--prompts-file", "FILE"], "give either a PROMPT"),
        (["Hello", "--batch", 2], "--batch needs --prompts-file"),
        (["--prompts-file", "FILE", "--batch", 0], "a size >= 1"),
    ],
)
def test_generate_needs_one_prompt_source_and_a_valid_batch(args, message, prompts_file):
    args = [prompts_file if a == "FILE" else a for a in args]
    assert message in one_line_error(run("generate", *args, *PAIR))


# every bad input: one line on stderr, non-zero exit


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-n", "-2"], "--max-tokens must be >= 1, or -1 for no limit"),
        (["-n", "0"], "--max-tokens must be >= 1"),
        (["-n", "many"], "--max-tokens"),
        (["--temp", "-0.5"], "temperature must be >= 0"),
        (["--temp", "nan"], "temperature must be a finite number"),
        (["--top-p", "inf"], "top_p must be a finite number"),
        (["--top-p", "-0.5"], "top_p must be in [0, 1]"),
        (["--top-p", "1.5"], "top_p must be in [0, 1]"),
        (["--top-k", "-1"], "top_k"),
        (["--min-p", "2"], "min_p"),
        (["--draft-tokens", "99"], "--draft-tokens must be in"),
        (["--bogus"], "No such option"),
    ],
)
def test_bad_flag_values_fail_in_one_line(flags, message):
    assert message in one_line_error(run("generate", "Hello", *PAIR, *flags))


def test_an_unknown_alias_fails_and_lists_the_known_ones():
    line = one_line_error(run("generate", "Hello", "-m", "gemma-9"))
    assert "unknown model 'gemma-9'" in line and "gemma-4-e2b" in line


@pytest.mark.parametrize("args, input", [(["", *PAIR], None), (["-", *PAIR], "")])
def test_an_empty_prompt_fails(args, input):
    assert "the prompt is empty" in one_line_error(run("generate", *args, input=input))


def test_a_prompt_longer_than_the_context_fails():
    rng = random.Random(0)
    prompt = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(12000))
    assert "context" in one_line_error(run("generate", prompt, *PAIR))


def test_a_mismatched_pair_fails():
    line = one_line_error(run("generate", "Hello", "--target", TARGET, "--drafter", FIXTURES / "drafter_bad_hidden"))
    assert "backbone_hidden_size" in line


def test_missing_and_corrupt_checkpoints_fail(tmp_path):
    assert "no such directory" in one_line_error(run("generate", "Hello", "--target", tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(run("generate", "Hello", "--target", broken))
    shutil.copy(TARGET / "config.json", broken / "config.json")
    assert "no model*.safetensors" in one_line_error(run("generate", "Hello", "--target", broken))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "cannot load weights" in one_line_error(run("generate", "Hello", "--target", broken))


def test_conflicting_model_flags_fail():
    assert "--drafter needs --target" in one_line_error(run("generate", "Hello", "--drafter", DRAFTER))
    assert "not both" in one_line_error(run("generate", "Hello", "-m", "gemma-4-e2b", *PAIR))


def test_no_model_named_and_no_default_pair_fails(toml):
    toml('[x]\ntarget = "a/b"\ndrafter = "a/c"\n')
    assert "no model named" in one_line_error(run("generate", "Hello"))


def test_verbose_shows_the_traceback_instead():
    result = run("generate", "Hello", "--target", TARGET, "--drafter", FIXTURES / "drafter_bad_hidden", "-v")
    assert result.exit_code != 0 and isinstance(result.exception, mlx_mtp.LoadError)


# Hugging Face repos and the default pair


def test_repo_ids_load_from_the_hub_cache_offline(hub_cache):
    copy_to_hub_cache(hub_cache, "tiny/target", TARGET)
    copy_to_hub_cache(hub_cache, "tiny/drafter", DRAFTER)
    out = generate_json("Hello world", "--target", "tiny/target", "--drafter", "tiny/drafter", "-n", 8)
    assert out["tokens"] == generate_json("Hello world", *PAIR, "-n", 8)["tokens"]


def test_offline_and_not_cached_names_the_missing_repo(hub_cache):
    copy_to_hub_cache(hub_cache, "tiny/target", TARGET)
    line = one_line_error(run("generate", "Hello", "--target", "tiny/target", "--drafter", "tiny/absent"))
    assert "tiny/absent" in line and "hf download tiny/absent" in line


def test_an_alias_resolves_through_the_hub_cache(hub_cache, toml):
    copy_to_hub_cache(hub_cache, "tiny/target", TARGET)
    copy_to_hub_cache(hub_cache, "tiny/drafter", DRAFTER)
    toml('[tiny]\ntarget = "tiny/target"\ndrafter = "tiny/drafter"\ndraft_tokens = 3\n')
    out = generate_json("Hello world", "-m", "tiny", "-n", 8, "--draft-tokens", 3)
    assert out["model"] == "tiny" and len(out["stats"]["per_position_acceptance"]) == 3


def test_with_no_model_named_commands_use_the_embedded_pair(toml, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_mtp.checkpoints.embedded", types.SimpleNamespace(ensure_target=lambda: TARGET))
    toml(f'[hub]\ntarget = "a/b"\ndrafter = "a/c"\n\n[small]\nkind = "embedded"\ndrafter = "{DRAFTER}"\n')
    out = generate_json("Hello world", "-n", 8)
    assert out["model"] == "small"
    assert out["tokens"] == generate_json("Hello world", *PAIR, "-n", 8)["tokens"]


# models


def test_models_shows_every_alias_and_what_is_downloaded(hub_cache, toml):
    copy_to_hub_cache(hub_cache, "tiny/target", TARGET)
    copy_to_hub_cache(hub_cache, "tiny/drafter", DRAFTER)
    toml('[tiny]\ntarget = "tiny/target"\ndrafter = "tiny/drafter"\n\n[far]\ntarget = "a/b"\ndrafter = "tiny/drafter"\n')
    result = run("models")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.strip()}
    assert rows["tiny"][0] == "tiny/target" and rows["tiny"][-1] == "yes" and "MB" in rows["tiny"]
    assert rows["far"][0] == "a/b" and rows["far"][-1] == "drafter"


def test_models_lists_the_shipped_pairs_offline(hub_cache):
    result = run("models")
    assert result.exit_code == 0, result.output
    for alias in ["gemma-4-e2b", "gemma-4-e4b-4bit", "gemma-4-26b-a4b", "gemma-4-31b"]:
        assert alias in result.stdout


# chat


def replies(result) -> list:
    """The summary line printed after each reply."""
    return [line for line in result.stdout.splitlines() if re.match(r"(\[stopped\] )?\d+ tokens, ", line)]


def test_chat_over_several_turns_with_reset_stats_and_system():
    script = "Hello there\nHow are you?\n/stats\n/reset\nHi again\n/system Be brief.\nAnd now?\n/oops\n/exit\nnot read\n"
    result = run("chat", *PAIR, "-n", 10, "--draft-tokens", 2, input=script)
    assert result.exit_code == 0, result.output
    assert len(replies(result)) == 4
    assert "2 replies: 20 tokens" in result.stdout and "acceptance by position" in result.stdout
    assert "new conversation" in result.stdout and "system prompt set" in result.stdout
    assert "unknown command /oops" in result.stdout


def test_chat_exits_on_end_of_input():
    result = run("chat", *PAIR, input="")
    assert result.exit_code == 0 and replies(result) == []


def test_chat_takes_the_model_as_an_argument(hub_cache, toml):
    copy_to_hub_cache(hub_cache, "tiny/target", TARGET)
    copy_to_hub_cache(hub_cache, "tiny/drafter", DRAFTER)
    toml('[tiny]\ntarget = "tiny/target"\ndrafter = "tiny/drafter"\n')
    result = run("chat", "tiny", "-n", 4, input="Hello\n")
    assert result.exit_code == 0 and len(replies(result)) == 1


@pytest.fixture
def fed(monkeypatch):
    """Record what each turn feeds the prompt cache; optionally raise SIGINT after the first chunk."""
    prompts, real = [], chat.stream_generate
    interrupt = []

    def recording(pair, prompt, **kwargs):
        prompts.append(prompt)
        for i, response in enumerate(real(pair, prompt, **kwargs)):
            yield response
            if interrupt and i == 0:
                interrupt.pop()
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(chat, "stream_generate", recording)
    return types.SimpleNamespace(prompts=prompts, interrupt=interrupt)


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(fed):
    fed.interrupt.append(True)
    result = run("chat", *PAIR, "-n", 30, input="Hello\nNext\n")
    assert result.exit_code == 0, result.output
    assert "[stopped] " in result.stdout and "30 tokens" in result.stdout
    assert fed.prompts[0].startswith("<bos><start_of_turn>user\nHello")
    # The second turn continues the first (the cut reply stays), it does not start over.
    assert fed.prompts[1] == "<end_of_turn>\n<start_of_turn>user\nNext<end_of_turn>\n<start_of_turn>model\n"


def test_ctrl_c_at_the_prompt_only_clears_the_line(monkeypatch):
    real, calls = builtins.input, []

    def flaky(prompt=""):
        calls.append(prompt)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(prompt)

    monkeypatch.setattr(builtins, "input", flaky)
    result = run("chat", *PAIR, "-n", 4, input="Hello\n")
    assert result.exit_code == 0 and len(replies(result)) == 1


def test_chat_turns_continue_the_prompt_cache_exactly(fed):
    pair = load_pair("e2b")
    conversation = chat.Conversation(pair)
    turns = []
    for text in ["Hello there", "Tell me more", "Thanks"]:
        before = len(conversation.cache.tokens)
        ids = [t for r in conversation.reply(text, max_tokens=9) for t in r.tokens]
        turns.append((before, ids, conversation.replies[-1].prompt_tokens))
    tokens = conversation.cache.tokens
    for before, ids, fed_tokens in turns:
        end = before + fed_tokens + len(ids)
        # Each turn replied exactly as a fresh start on everything before it would.
        assert mlx_mtp.generate(pair, tokens[: end - len(ids)], max_tokens=len(ids)).tokens == ids
    # ... and read only its own new text.
    before, ids, fed_tokens = turns[-1]
    assert pair.tokenizer.decode(tokens[before : before + fed_tokens]) == (
        "<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.fixture
def stub(monkeypatch):
    """A stream_generate that commits a scripted reply and records what it was fed."""
    fed, script = [], []

    def fake(pair, prompt, prompt_cache, **kwargs):
        fed.append(prompt)
        text, tokens, finish = script.pop(0)
        prompt_cache.tokens += pair.tokenizer.encode(prompt, add_special_tokens=False) + tokens
        yield GenerationResponse(text, tokens, Stats(generation_tokens=len(tokens)), finish)

    monkeypatch.setattr(chat, "stream_generate", fake)
    return types.SimpleNamespace(fed=fed, script=script)


NEXT_TURN = "<start_of_turn>user\nsecond<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(
    "ending, expected",
    [
        ((["Sure."], [300, END_OF_TURN], "stop"), "\n" + NEXT_TURN),  # the template's own end
        ((["Sure."], [300, EOS], "stop"), "<end_of_turn>\n" + NEXT_TURN),  # another EOS
        ((["Sure."], [300], "length"), "<end_of_turn>\n" + NEXT_TURN),  # cut at max tokens
        ((["Sure. "], [300], "length"), "<end_of_turn>\n" + NEXT_TURN),  # the template trims the reply
        (([" Sure."], [300], "length"), "<end_of_turn>\n" + NEXT_TURN),
    ],
)
def test_a_turn_feeds_only_what_the_cache_lacks(stub, ending, expected):
    (text,), tokens, finish = ending
    stub.script += [(text, tokens, finish), ("Fine.", [301], "length")]
    conversation = chat.Conversation(load_pair("e2b"))
    list(conversation.reply("first"))
    list(conversation.reply("second"))
    assert stub.fed[0] == "<bos><start_of_turn>user\nfirst<end_of_turn>\n<start_of_turn>model\n"
    assert stub.fed[1] == expected
    assert conversation.messages[1] == {"role": "assistant", "content": text}


def test_a_new_system_prompt_reads_the_conversation_again(stub):
    stub.script += [("Sure.", [300], "length"), ("Fine.", [301], "length")]
    conversation = chat.Conversation(load_pair("e2b"))
    list(conversation.reply("first"))
    conversation.set_system("Be brief.")
    list(conversation.reply("second"))
    assert stub.fed[1].startswith("<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nfirst")
    assert stub.fed[1].endswith(NEXT_TURN)


def test_a_turn_that_fails_before_its_first_token_changes_nothing(monkeypatch):
    def too_long(pair, prompt, **kwargs):
        raise ValueError("the prompt needs 5000 positions but the target's context is 4096")
        yield

    conversation = chat.Conversation(load_pair("e2b"))
    monkeypatch.setattr(chat, "stream_generate", too_long)
    with pytest.raises(ValueError):
        list(conversation.reply("first"))
    assert conversation.messages == [] and conversation.cache.tokens == [] and conversation.replies == []


def test_chat_reports_a_failed_turn_and_goes_on(monkeypatch):
    calls = []
    real = chat.stream_generate

    def first_fails(pair, prompt, **kwargs):
        calls.append(prompt)
        if len(calls) == 1:
            raise ValueError("the prompt needs 5000 positions but the target's context is 4096")
        yield from real(pair, prompt, **kwargs)

    monkeypatch.setattr(chat, "stream_generate", first_fails)
    result = run("chat", *PAIR, "-n", 4, input="Hello\nHello again\n")
    assert result.exit_code == 0 and "context is 4096" in result.stdout and len(replies(result)) == 1
    assert calls[1].startswith("<bos>")  # the failed turn left nothing behind


@pytest.fixture
def base_target(tmp_path):
    """The e2b fixture without a chat template: a checkpoint taken for a base model."""
    target = tmp_path / "base_target"
    shutil.copytree(TARGET, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def first_occurrence(text: str, start: int) -> int:
    """A position >= start where the 3 characters there occur for the first time."""
    return next(i for i in range(start, len(text) - 3) if text.find(text[i : i + 3]) == i)


def test_a_base_target_chats_through_the_dialogue_framing(base_target, fed):
    pair = mlx_mtp.load(str(base_target), str(DRAFTER))
    assert pair.chat == "dialogue"
    conversation = chat.Conversation(pair)
    seen = chat.DIALOGUE_PREAMBLE + "\n\nUser: Hello\nAssistant:"
    # What the model says to that, and a stop text in its middle, as a turn marker would be.
    full = mlx_mtp.generate(pair, seen, max_tokens=16).text
    cut = first_occurrence(full, 4)
    conversation.stops = [full[cut : cut + 3]]
    shown = "".join(r.text for r in conversation.reply("Hello", max_tokens=16))
    assert fed.prompts[0] == seen  # exactly the expected text
    assert shown == full[:cut]  # stopped there, and the stop text is not shown
    assert conversation.messages[-1] == {"role": "assistant", "content": shown}
    # The cache keeps the reply only up to the stop: what it holds is what was shown.
    held = pair.tokenizer.decode(conversation.cache.tokens)
    assert held + conversation.unfed == "<bos>" + seen + shown
    # The next turn reads only the new text and answers as a fresh run on the whole text.
    before = list(conversation.cache.tokens)
    ids = [t for r in conversation.reply("Thanks", max_tokens=8) for t in r.tokens]
    assert held + fed.prompts[1] == "<bos>" + seen + shown + "\n\nUser: Thanks\nAssistant:"
    read = before + encode(pair.tokenizer, fed.prompts[1], first=False)
    assert conversation.cache.tokens[: len(read)] == read
    assert mlx_mtp.generate(pair, read, max_tokens=8).tokens == ids


def test_chat_with_a_base_target_says_what_it_is(base_target):
    result = run("chat", "--target", base_target, "--drafter", DRAFTER, "-n", 4, input="Hello\n")
    assert result.exit_code == 0, result.output
    assert "a base model" in result.stdout and "mlx-mtp chat -m gemma-4-e2b" in result.stdout
    assert len(replies(result)) == 1
    templated = run("chat", *PAIR, "-n", 4, input="Hello\n")
    assert "a base model" not in templated.stdout


def test_the_embedded_pair_is_a_base_model_with_a_label():
    entry = registry.find_pair("gemma-3-270m")
    assert entry.chat == "dialogue" and entry.label == "Gemma 3 270M base, offline demo"
    assert all(e.chat in ("", "template") for e in registry.load_registry().values() if e.kind != "embedded")


# bench


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello world\n\nWrite a list of colours\n")
    return path


def test_bench_writes_a_summary_per_setting_and_every_run(prompts_file, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--prompts", prompts_file, "-n", 6, "--repeats", 1, "--draft-tokens", "1,2", "--temp", "0,0.7"]
    result = run("bench", *PAIR, *args, "--json-out", out)
    assert result.exit_code == 0, result.output
    assert "overall speedup" in result.stdout
    report = json.loads(out.read_text())
    keys = {"kind", "temperature", "draft_tokens", "baseline_tps", "mtp_tps", "speedup", "acceptance"}
    assert len(report["summary"]) == 4
    for entry in report["summary"]:
        assert keys | {"mean_accepted_length", "identical"} <= set(entry)
        assert entry["kind"] == "file" and entry["speedup"] == pytest.approx(entry["mtp_tps"] / entry["baseline_tps"])
        assert entry["identical"] is (True if entry["temperature"] == 0 else None)
    assert [(e["temperature"], e["draft_tokens"]) for e in report["summary"]] == [(0, 1), (0, 2), (0.7, 1), (0.7, 2)]
    # One kind ("file"): each setting's overall speedup is its own, named by what differs.
    assert [e["speedup"] for e in report["overall"]] == [e["speedup"] for e in report["summary"]]
    assert "overall speedup T=0 K=1 " in " ".join(result.stdout.split())
    assert len(report["runs"]) == 2 * 4 and report["overall_speedup"] > 0
    assert report["machine"]["device"] and report["config"]["max_tokens"] == 6


def test_bench_measures_costs_afresh_for_auto_draft_length(prompts_file, tmp_path, monkeypatch):
    # A stale measurement (taken while the machine was busy) must not outlive a bench run.
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    stale = {"target": [1000.0] * 5, "draft_step": 1000.0}
    (tmp_path / "costs.json").write_text(json.dumps({key: stale for key in costs_keys()}))
    out = tmp_path / "bench.json"
    result = run("bench", *PAIR, "--prompts", prompts_file, "-n", 4, "--repeats", 1, "--json-out", out)
    assert result.exit_code == 0, result.output
    costs = json.loads(out.read_text())["costs"]
    assert len(costs["target"]) == 5 and max(costs["target"]) < 1000.0  # K up to the default, 4
    assert costs in json.loads((tmp_path / "costs.json").read_text()).values()


def costs_keys():
    from mlx_mtp.engine.costs import shape_key

    pair = mlx_mtp.load(str(TARGET), str(DRAFTER))
    return [shape_key(pair, pair.default_draft_tokens)]


def test_bench_fails_when_greedy_outputs_differ(prompts_file, monkeypatch):
    real = bench.run_mtp

    def wrong(*args):
        (tokens,), *rest = real(*args)
        return [tokens[:-1] + [tokens[-1] + 1]], *rest

    monkeypatch.setattr(bench, "run_mtp", wrong)
    result = run("bench", *PAIR, "--prompts", prompts_file, "-n", 4, "--repeats", 1)
    assert result.exit_code == 1 and " NO" in result.stdout
    assert "differ in 2 of 2 runs" in one_line_error(result)


def test_bench_batches_against_mlx_lm_batches(prompts_file, tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", *PAIR, "--prompts", prompts_file, "-n", 6, "--repeats", 1, "--batch", "1,2", "--json-out", out)
    assert result.exit_code == 0, result.output
    assert "vs B=1" in result.stdout
    summary = json.loads(out.read_text())["summary"]
    assert [(e["batch"], e["identical"]) for e in summary] == [(1, True), (2, True)]
    assert summary[1]["vs_batch_1"] > 0
    assert len(summary[1]["row_acceptance"]) == 2 and "K chosen" in result.stdout
    rounds = json.loads(out.read_text())["runs"][1]["draft_tokens_chosen"]
    assert sum(summary[1]["draft_tokens_chosen"].values()) == len(rounds) > 0


def test_bench_bad_inputs_fail_in_one_line(prompts_file, tmp_path):
    assert "No such file" in one_line_error(run("bench", *PAIR, "--prompts", tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "no prompts" in one_line_error(run("bench", *PAIR, "--prompts", tmp_path / "empty.txt"))
    assert "against a drafter" in one_line_error(run("bench", "--target", TARGET, "--prompts", prompts_file))
    assert "--repeats" in one_line_error(run("bench", *PAIR, "--repeats", 0))
    assert "comma-separated" in one_line_error(run("bench", *PAIR, "--draft-tokens", "2,x"))
    assert "--batch sizes" in one_line_error(run("bench", *PAIR, "--batch", "0,4"))
    assert "no directory" in one_line_error(run("bench", *PAIR, "--json-out", tmp_path / "nowhere" / "b.json"))


def test_bench_compares_proposers_on_plain_text_with_the_cost_curve_and_bound(prompts_file, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--prompts", prompts_file, "-n", 8, "--repeats", 1, "--proposer", "hybrid,mtp", "--ignore-chat-template",
            "--draft-tokens", 2]
    result = run("bench", *PAIR, *args, "--json-out", out)
    assert result.exit_code == 0, result.output
    assert "(plain text)" in result.stdout and "bound" in result.stdout and "target forward over 1..5" in result.stdout
    report = json.loads(out.read_text())
    assert [e["proposer"] for e in report["summary"]] == ["hybrid", "mtp"]
    assert [e["proposer"] for e in report["overall"]] == ["hybrid", "mtp"]
    hybrid, mtp = (f"{e['speedup']:.2f}x" for e in report["overall"])
    assert f"overall speedup hybrid {hybrid}, mtp {mtp} (plain text)" in result.stdout
    assert report["config"]["prompt_format"] == "plain text"
    pair = load_pair("e2b")
    assert report["runs"][0]["prompt_tokens"] == [len(encode(pair.tokenizer, "Hello world"))]  # no template
    mtp = report["summary"][1]
    assert set(mtp["by_source"]) == {"mtp"}  # the drafter alone
    costs = report["costs"]
    assert len(costs["target"]) == 5 and costs["draft_step"] > 0 and costs["plain"] > 0
    assert report["target_vs_plain"] == pytest.approx([t / costs["plain"] for t in costs["target"]])
    ratios = " ".join(f"{r:.2f}" for r in report["target_vs_plain"])
    assert f"T(n)/P: {ratios}" in " ".join(result.stdout.split())
    runs = [r for r in report["runs"] if r["proposer"] == "mtp"]
    spent = sum(costs["target"][len(d)] + len(d) * costs["draft_step"] for r in runs for d in r["mtp"]["drafts"])
    committed = sum(sum(r["mtp"]["committed"]) for r in runs)
    assert mtp["bound"] == pytest.approx(committed * costs["plain"] / spent)  # at plain mlx-lm's step


def test_bench_continues_plain_text_on_a_base_target(base_target, prompts_file, tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "--target", base_target, "--drafter", DRAFTER, "--prompts", prompts_file, "-n", 4,
                 "--repeats", 1, "--json-out", out)
    assert result.exit_code == 0, result.output
    assert "(plain text, a base model)" in result.stdout
    assert json.loads(out.read_text())["config"]["prompt_format"] == "plain text, a base model"
    templated = run("bench", *PAIR, "--prompts", prompts_file, "-n", 4, "--repeats", 1)
    assert "(chat template)" in templated.stdout


@pytest.mark.parametrize("proposer, sources", [("mtp", {"mtp"}), ("ngram", {"ngram"}), ("hybrid", {"mtp", "ngram"})])
def test_generate_drafts_with_the_proposer_asked_for(proposer, sources):
    prompt = "one two three one two three one two three one two"
    out = generate_json(prompt, *PAIR, "-n", 16, "--proposer", proposer, "--draft-tokens", 2)
    expected = mlx_mtp.generate(load_pair("e2b"), prompt, max_tokens=16, num_draft_tokens=0)
    assert out["tokens"] == expected.tokens
    used = set(out["stats"]["sources"]) - {"none"}  # "none": a round with nothing to draft
    assert used == sources if proposer != "hybrid" else used <= sources and used


def test_bad_proposers_fail_in_one_line(prompts_file):
    assert "--proposer must be one of hybrid, mtp, ngram" in one_line_error(run("generate", "Hi", *PAIR, "--proposer", "x"))
    assert "--proposer must be one of" in one_line_error(run("bench", *PAIR, "--proposer", "hybrid,y"))
    assert "needs a drafter" in one_line_error(run("generate", "Hi", "--target", TARGET, "--proposer", "mtp"))
    assert "--proposer needs one of" in one_line_error(run("bench", *PAIR, "--proposer", ","))
    assert "bench needs --max-tokens >= 1" in one_line_error(run("bench", *PAIR, "--prompts", prompts_file, "-n", -1))


def test_bench_quick_runs_the_first_prompt_of_each_set_once(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", *PAIR, "--quick", "-n", 4, "--ignore-chat-template", "--json-out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    kinds = list(bench.load_prompts())
    assert sorted((r["kind"], r["prompt"]) for r in report["runs"]) == sorted((k, 0) for k in kinds)
    assert report["config"]["repeats"] == 1
