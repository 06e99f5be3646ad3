"""bench: plain mlx-lm against mlx-mtp on one loaded target, interleaved, summarized."""

import json
import math
import weakref
from dataclasses import replace

import pytest

import mlx_mtp
from conftest import FIXTURES, load_pair
from mlx_mtp.bench import report as bench_report
from mlx_mtp.bench import runner as bench
from mlx_mtp.engine.stats import Stats

KINDS = ["chat", "prose", "code", "structured", "math"]


def measure(pair, prompts, temperatures=(0.0,), ks=(2,), repeats=1, max_tokens=8, batches=()):
    tasks = bench.plan(pair, prompts, list(temperatures), list(ks), repeats, batches)
    return list(bench.benchmark(pair, tasks, max_tokens=max_tokens))


def test_the_builtin_prompts_cover_every_kind():
    prompts = bench.load_prompts()
    assert list(prompts) == KINDS
    assert all(len(texts) >= 3 and all(t.strip() for t in texts) for texts in prompts.values())


def test_a_prompts_file_has_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  \nsecond prompt\n")
    assert bench.load_prompts(path) == {"file": ["first prompt", "second prompt"]}
    path.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        bench.load_prompts(path)


def test_prompts_go_through_the_chat_template_or_are_continued_as_they_are():
    pair = load_pair("e2b")
    ids = bench.encode_prompt(pair, "Hello world", True)
    assert pair.tokenizer.decode(ids) == "<bos><start_of_turn>user\nHello world<end_of_turn>\n<start_of_turn>model\n"
    assert pair.tokenizer.decode(bench.encode_prompt(pair, "Hello world", False)) == "<bos>Hello world"


def test_the_plan_covers_every_setting_prompt_and_repeat():
    pair = load_pair("e2b")
    tasks = bench.plan(pair, {"a": ["x", "y"], "b": ["z"]}, [0.0, 0.7], [2, 4], repeats=3)
    assert len(tasks) == 3 * 2 * 2 * 3
    settings = list(dict.fromkeys(t.setting for t in tasks))
    assert settings[:4] == [bench.Setting("a", t, k) for t in (0.0, 0.7) for k in (2, 4)]


def test_greedy_runs_match_plain_mlx_lm_and_are_marked_identical():
    pair = load_pair("e2b")
    runs = measure(pair, {"p": ["Hello world", "Write a list"]}, ks=(1, 3), repeats=2)
    assert len(runs) == 2 * 2 * 2
    for run in runs:
        (tokens,) = run.mtp_tokens
        assert run.identical is True and len(tokens) == 8
        assert tokens == mlx_mtp.generate(pair, run.task.prompts[0], max_tokens=8).tokens
        assert run.baseline_tps > 0 and run.mtp_tps == run.stats.generation_tps > 0


def test_the_identity_check_counts_the_eos_as_mlx_lm_yields_it():
    pair = mlx_mtp.load(str(FIXTURES / "target_e2b"), str(FIXTURES / "drafter_sparse"))
    prompt = bench.encode_prompt(pair, "Hello world", True)
    stop = mlx_mtp.generate(pair, prompt, max_tokens=6).tokens[3]
    pair = replace(pair, eos_ids=pair.eos_ids | {stop})
    pair.tokenizer.add_eos_token(str(stop))
    (run,) = measure(pair, {"p": ["Hello world"]}, max_tokens=20)
    assert run.mtp_tokens[0][-1] == stop and run.stats.generation_tokens <= 4
    assert run.identical is True
    # mlx-lm's batch_generate leaves the EOS out: the batched check compares without it.
    (run,) = measure(pair, {"p": ["Hello world"]}, max_tokens=20, batches=(1,))
    assert stop not in run.mtp_tokens[0] and run.identical is True


def test_sampled_runs_have_no_identity_verdict():
    runs = measure(load_pair("e2b"), {"p": ["Hello world"]}, temperatures=(0.8,))
    assert [r.identical for r in runs] == [None]


def test_the_summary_has_one_entry_per_setting_with_medians():
    pair = load_pair("e2b")
    runs = measure(pair, {"a": ["Hello world"], "b": ["Write a list"]}, temperatures=(0.0, 0.9), repeats=3)
    result = bench_report.summarize(runs)
    assert [(e["kind"], e["temperature"]) for e in result["summary"]] == [
        ("a", 0.0), ("a", 0.9), ("b", 0.0), ("b", 0.9)
    ]
    for entry in result["summary"]:
        group = [r for r in runs if (r.task.setting.kind, r.task.setting.temperature) == (entry["kind"], entry["temperature"])]
        assert entry["runs"] == 3
        assert entry["baseline_tps"] == sorted(r.baseline_tps for r in group)[1]
        assert entry["mtp_tps"] == sorted(r.mtp_tps for r in group)[1]
        assert entry["speedup"] == pytest.approx(entry["mtp_tps"] / entry["baseline_tps"])
        assert entry["acceptance"] == Stats.pooled([r.stats for r in group]).acceptance_rate
        assert entry["identical"] is (True if entry["temperature"] == 0 else None)
    speedups = [e["speedup"] for e in result["summary"]]
    assert min(speedups) <= result["overall_speedup"] <= max(speedups)


def test_the_overall_speedup_is_given_per_proposer_over_the_kinds():
    pair = load_pair("e2b")
    tasks = bench.plan(pair, {"a": ["Hello world"], "b": ["Write a list"]}, [0.0], [2], 1, proposers=("hybrid", "mtp"))
    result = bench_report.summarize(list(bench.benchmark(pair, tasks, max_tokens=8)))
    speedups = {(e["proposer"], e["kind"]): e["speedup"] for e in result["summary"]}
    assert len(speedups) == 4
    assert [(e["proposer"], e["temperature"], e["draft_tokens"], e["batch"]) for e in result["overall"]] == [
        ("hybrid", 0.0, 2, None), ("mtp", 0.0, 2, None)
    ]
    for entry in result["overall"]:
        a, b = speedups[entry["proposer"], "a"], speedups[entry["proposer"], "b"]
        assert entry["speedup"] == pytest.approx((a * b) ** 0.5)
    assert result["overall_speedup"] == pytest.approx(math.prod(speedups.values()) ** 0.25)


def test_a_batch_plan_takes_the_first_prompts_of_all_kinds():
    pair = load_pair("e2b")
    tasks = bench.plan(pair, {"a": ["x", "y"], "b": ["z"]}, [0.0], [2], repeats=2, batches=[1, 4])
    assert [(t.setting.batch, len(t.prompts)) for t in tasks] == [(1, 1), (1, 1), (4, 4), (4, 4)]
    x, y, z = (bench.encode_prompt(pair, p, True) for p in "xyz")
    assert tasks[-1].prompts == [x, y, z, x]


def test_batched_runs_match_mlx_lm_batches_row_by_row():
    pair = load_pair("e2b")
    runs = measure(pair, {"p": ["Hello world", "Write a list", "Hi"]}, batches=(1, 3))
    assert [len(r.mtp_tokens) for r in runs] == [1, 3]
    assert all(r.identical for r in runs)
    for tokens, prompt in zip(runs[1].mtp_tokens, runs[1].task.prompts):
        assert tokens == mlx_mtp.generate(pair, prompt, max_tokens=8).tokens
    (alone, together) = bench_report.summarize(runs)["summary"]
    assert alone["batch"] == 1 and alone["vs_batch_1"] == 1.0
    rows = runs[1].row_stats
    assert together["row_acceptance"] == [r.acceptance_rate for r in rows]
    chosen = together["draft_tokens_chosen"]  # K fixed at 2 (fewer where every row nears its limit)
    assert set(chosen) <= {0, 1, 2} and chosen[2] > 0 and sum(chosen.values()) == len(runs[1].draft_tokens_chosen)
    assert together["vs_batch_1"] == pytest.approx(together["mtp_tps"] / alone["mtp_tps"])


def test_pooled_stats_count_every_round_of_every_run():
    a = Stats(generation_tokens=5, generation_time=1.0, drafts=[[1, 2], [3, 4]], accepted=[2, 0], sources=["mtp"] * 2)
    b = Stats(generation_tokens=3, generation_time=1.0, drafts=[[5, 6]], accepted=[1], sources=["ngram"])
    pooled = Stats.pooled([a, b])
    assert pooled.rounds == 3 and pooled.acceptance_rate == 3 / 6
    assert pooled.per_position_acceptance == [2 / 3, 1 / 3]
    assert pooled.by_source["ngram"]["acceptance"] == 0.5
    # Per source: the K it was given and how far its drafts held, position by position.
    c = Stats(drafts=[[1, 2, 3], [4], [5, 6, 7], []], accepted=[3, 0, 1, 0], sources=["ngram", "mtp", "ngram", "none"])
    assert c.by_source["ngram"]["draft_tokens_chosen"] == {3: 2} and c.by_source["mtp"]["draft_tokens_chosen"] == {1: 1}
    assert c.by_source["ngram"]["per_position_acceptance"] == [1.0, 0.5, 0.5]
    assert c.by_source["mtp"]["per_position_acceptance"] == [0.0] and "none" not in c.by_source
    assert pooled.generation_tps == 4.0
    assert a.rounds == 2  # the inputs are left alone


def test_the_report_is_json_with_runs_and_machine_info():
    pair = load_pair("e2b")
    runs = measure(pair, {"p": ["Hello world"]})
    report = json.loads(json.dumps(bench_report.report(pair, runs, {"max_tokens": 8})))
    assert set(report) >= {"summary", "overall_speedup", "runs", "machine", "config"}
    (run,) = report["runs"]
    assert run["identical"] is True and run["mtp"]["generation_tokens"] == run["baseline"]["generation_tokens"] == 8
    assert {"platform", "device", "mlx", "mlx-lm", "mlx-mtp"} <= set(report["machine"])


def test_the_bench_measures_the_costs_of_the_products_the_forward_runs(monkeypatch):
    """The costs the bench measures (and chooses K from) are of the forward with the
    chosen products: they are chosen first (they used to be chosen just after, so the
    costs were of the default product, 2.5x too slow for 2-5 tokens on an Intel CPU)."""
    from mlx_mtp.engine import costs
    from mlx_mtp.models import products

    pair = load_pair("e2b")
    monkeypatch.setattr(products, "_chosen", {})  # (a fresh process: nothing chosen yet,
    monkeypatch.setattr(costs.CostModel, "_by_pair", weakref.WeakKeyDictionary())  # no cost model)
    chosen_when_measured = []
    real = costs.measure_costs

    def spy(*args, **kwargs):
        chosen_when_measured.append(bool(products._chosen))
        return real(*args, **kwargs)

    monkeypatch.setattr(costs, "measure_costs", spy)
    measure(pair, {"chat": ["Hello there"]}, ks=(None,), max_tokens=4)
    assert chosen_when_measured and all(chosen_when_measured)
