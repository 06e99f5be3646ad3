"""A target pipeline-sharded over ranks started by the real `mlx.launch -n N --backend ring` on
127.0.0.1: the library, `generate`, `chat` and `serve` give exactly what one process gives."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import mlx_mtp
import pipeline_run
from conftest import MLX_LM_PREFILL, FIXTURES, load_pair, plain_greedy, prompt_of
from mlx_mtp.models.pipeline import PipelineError, layer_ranges, weight_bytes

BIN = Path(sys.executable).parent
PAIR = ["--target", str(FIXTURES / "target_e2b"), "--drafter", str(FIXTURES / "drafter_sparse")]
distributed = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(n: int, *command) -> list:
    # The ranks listen on consecutive ports from -p; two local ranks share two cores, so
    # one OpenMP thread each (MKL's spinning threads would take the other rank's core).
    return [str(BIN / "mlx.launch"), "-n", str(n), "--backend", "ring", "-p", str(free_port()),
            "--env", "OMP_NUM_THREADS=1", "--", *map(str, command)]


def launch(n: int, *command, input=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(n, *command), input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def cli(*args, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlx-mtp"), *map(str, args)], input=input, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# The split: contiguous ranges, rank 0 the last layers, the drafter's KV layers on rank 0.

def test_layers_are_split_evenly_with_rank_0_last():
    assert layer_ranges(18, 2, None) == [(9, 18), (0, 9)]
    assert layer_ranges(7, 3, None) == [(4, 7), (2, 4), (0, 2)]
    assert layer_ranges(4, 4, None) == [(3, 4), (2, 3), (1, 2), (0, 1)]


def test_the_layers_the_drafter_reads_stay_on_rank_0():
    # E2B-like: layers 2 and 3 hold the KV of the shared layers 4..7 and of the drafter.
    assert layer_ranges(8, 2, 2) == [(2, 8), (0, 2)]
    assert layer_ranges(8, 3, 2) == [(2, 8), (1, 2), (0, 1)]
    assert layer_ranges(60, 2, 58) == [(30, 60), (0, 30)]  # already there: no change


def test_splits_that_cannot_be_made_are_one_line_errors():
    with pytest.raises(PipelineError, match="cannot split the target's 6 layers over 7 ranks"):
        layer_ranges(6, 7, None)
    with pytest.raises(PipelineError, match=r"rank 0 must hold layers 2\.\.7 .*leaves 2 for 3 ranks"):
        layer_ranges(8, 4, 2)


# The library under mlx.launch against one process (tests/pipeline_run.py).

@pytest.fixture(scope="module")
def two_ranks():
    run = launch(2, sys.executable, "pipeline_run.py", "31b", "e2b", "moe")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@distributed
@pytest.mark.parametrize("name", ["31b", "e2b", "moe"])
def test_a_sharded_pair_generates_what_one_process_does(two_ranks, name):
    one, two = pipeline_run.scenarios(name), two_ranks[name]
    assert two.keys() == one.keys()
    for scenario in one:
        if scenario in ("distributed", "greedy auto K"):
            continue
        # Tokens, and every draft: the drafter on rank 0 read the same KV as in one process.
        assert two[scenario] == one[scenario], scenario
    # K chosen per round comes from each run's measured costs: only the tokens must agree.
    assert two["greedy auto K"]["tokens"] == one["greedy auto K"]["tokens"]
    # Greedy is the target's own output, at any K, sharded or not.
    pair = load_pair(name)
    plain = plain_greedy(pair.target.model, prompt_of(40, seed=1), 40)
    for k in ("greedy K=0", "greedy K=1", "greedy K=3", "greedy auto K"):
        assert two[k]["tokens"] == plain, k


@distributed
@pytest.mark.parametrize("name", ["31b", "e2b"])
def test_each_rank_holds_only_its_share_of_the_weights(two_ranks, name):
    layout = two_ranks[name]["distributed"]
    assert layout["world_size"] == 2
    ranks = layout["ranks"]
    # Rank 0 the last layers through the end, rank 1 the first ones: nothing missing, nothing twice.
    assert ranks[1]["layers"][0] == 0 and ranks[1]["layers"][1] + 1 == ranks[0]["layers"][0]
    assert ranks[0]["layers"][1] == len(load_pair(name).target.layer_types) - 1
    # Only the tied embedding is on both (rank 1 reads tokens with it, rank 0 uses it as the head).
    target = load_pair(name).target
    whole = weight_bytes(target.model)
    embedding = target.decoder.embed_tokens.weight.nbytes
    assert sum(r["weight_bytes"] for r in ranks) == whole + embedding
    assert all(r["weight_bytes"] < whole for r in ranks)


# The commands under mlx.launch.

@distributed
def test_generate_json_names_the_ranks_and_equals_one_process():
    args = ["generate", *PAIR, "Hello world", "--max-tokens", 30, "--draft-tokens", 3, "--json"]
    one = json.loads(cli(*args).stdout)
    run = launch(2, BIN / "mlx-mtp", *args)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # output once, from rank 0
    two = json.loads(lines[0])
    assert two["tokens"] == one["tokens"] and two["text"] == one["text"]
    assert two["stats"]["drafts"] == one["stats"]["drafts"]
    assert one["distributed"] is None
    assert [r["layers"] for r in two["distributed"]["ranks"]] == [[2, 7], [0, 1]]


@distributed
def test_generate_sampled_at_a_fixed_k_equals_one_process():
    args = ["generate", *PAIR, "Once upon", "--max-tokens", 25, "--draft-tokens", 2, "--temp", 0.8, "--seed", 11,
            "--json"]
    one = json.loads(cli(*args).stdout)
    two = json.loads(launch(2, BIN / "mlx-mtp", *args).stdout)
    assert two["tokens"] == one["tokens"]


@distributed
def test_chat_replies_as_one_process():
    turns = "Hello there\nAnd then?\n/stats\n/exit\n"  # mlx.launch never passes on the end of stdin
    args = ["chat", *PAIR, "--max-tokens", 12, "--draft-tokens", 2]
    one = cli(*args, input=turns)
    two = launch(2, BIN / "mlx-mtp", *args, input=turns)
    assert two.returncode == 0, two.stderr

    def replies(out):  # the streamed text, without the timing lines
        return [line for line in out.splitlines() if "tok/s" not in line]

    assert replies(two.stdout) == replies(one.stdout)
    assert two.stdout.count("12 tokens") == 2


@distributed
def test_serve_answers_as_one_process_and_rejects_bad_requests():
    port = free_port()
    process = subprocess.Popen(launch_command(2, BIN / "mlx-mtp", "serve", *PAIR, "--port", port,
                                              "--draft-tokens", 2),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and process.poll() is None, process.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = str(FIXTURES / "target_e2b")
        pair = load_pair("e2b")
        prompts = [prompt_of(n, seed=n) for n in (4, 17, 9)]
        from concurrent.futures import ThreadPoolExecutor

        def complete(prompt):  # concurrent requests share the rounds
            return client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

        with ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(complete, prompts))
        assert texts == [mlx_mtp.generate(pair, p, max_tokens=16, num_draft_tokens=2).text for p in prompts]
        sampled = client.completions.create(model=model, prompt=prompts[1], max_tokens=12, temperature=0.9, seed=5)
        assert sampled.choices[0].text == mlx_mtp.generate(pair, prompts[1], max_tokens=12, temperature=0.9,
                                                           seed=5, num_draft_tokens=2).text
        with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
            client.completions.create(model=model, prompt=[5, 10**7], max_tokens=3)
        # Still serving, the conversation store included: the same prompt again continues a kept one.
        again = client.completions.create(model=model, prompt=prompts[1], max_tokens=16, temperature=0)
        assert again.choices[0].text == texts[1]
        # A prompt past a prefill chunk (and a plan of many kilobytes to the other rank).
        long = prompt_of(MLX_LM_PREFILL + 40, seed=8)
        text = client.completions.create(model=model, prompt=long, max_tokens=8, temperature=0).choices[0].text
        assert text == mlx_mtp.generate(pair, long, max_tokens=8, num_draft_tokens=2).text
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


# Bad setups.

@distributed
def test_a_drafter_that_cannot_sit_with_its_kv_layers_is_one_line_from_rank_0():
    run = launch(4, BIN / "mlx-mtp", "generate", *PAIR, "Hi", "--max-tokens", 3)
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert errors == ["error: cannot split the target's 8 layers over 4 ranks: rank 0 must hold layers 2..7 "
                      "(the drafter reads their KV, or later layers share it), which leaves 2 for 3 ranks"]
    assert "Traceback" not in run.stderr


@distributed
def test_more_ranks_than_layers_is_one_line():
    target = ["--target", str(FIXTURES / "target_31b")]  # 6 layers, no drafter
    run = launch(7, BIN / "mlx-mtp", "generate", *target, "Hi", "--max-tokens", 3)
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert errors == ["error: cannot split the target's 6 layers over 7 ranks"]


@distributed
def test_ranks_that_cannot_reach_each_other_get_one_line(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "1"}
    run = subprocess.run([str(BIN / "mlx-mtp"), "generate", *PAIR, "Hi", "--max-tokens", "3"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 1
    assert run.stderr.startswith("rank 1: error: cannot reach the other ranks ([ring] Couldn't connect")
    assert len(run.stderr.strip().splitlines()) == 1


def test_an_interrupt_ends_the_generation_after_the_round_under_way():
    import threading

    pair = load_pair("e2b")
    prompt = prompt_of(MLX_LM_PREFILL + 30, seed=4)  # read in two chunks first
    full = mlx_mtp.generate(pair, prompt, max_tokens=20, num_draft_tokens=2)
    stop, chunks = threading.Event(), []
    for response in mlx_mtp.stream_generate(pair, prompt, max_tokens=20, num_draft_tokens=2, interrupt=stop):
        chunks.append(response)
        stop.set()  # after the first token: one more round, then the end
    assert len(chunks) == 2 and chunks[-1].finish_reason == "interrupted"
    tokens = [t for c in chunks for t in c.tokens]
    assert tokens == full.tokens[: len(tokens)] and 2 <= len(tokens) <= 4


def test_interrupt_must_be_an_event():
    with pytest.raises(ValueError, match="interrupt must be a threading.Event, got str"):
        mlx_mtp.generate(load_pair("e2b"), [5, 6], max_tokens=3, interrupt="stop")


def test_bench_refuses_a_launch(monkeypatch):
    from typer.testing import CliRunner

    from mlx_mtp import cli as mlx_mtp_cli

    monkeypatch.setenv("MLX_RANK", "0")
    result = CliRunner().invoke(mlx_mtp_cli.app, ["bench", *PAIR])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: bench compares with plain mlx-lm in one process")
