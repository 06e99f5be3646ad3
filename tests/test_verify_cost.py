"""The CPU verify path: column-major products, compiled norms and rope, the drafter's
per-row head, cost bounds and costs that are measured again when live rounds disagree with
them."""

import json
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_mtp
from conftest import FIXTURES, PAIRS, ContinuationProposer, load_pair, plain_greedy, prompt_of
from mlx_mtp.models.head import ClusteredHead
from mlx_mtp.engine.stats import Stats
from mlx_lm.models import gemma3_text
from mlx.utils import tree_map

from mlx_mtp.models import cpu
from mlx_mtp.models import products
from mlx_mtp.models.cpu import MeasuredLinear, for_cpu
from mlx_mtp.engine.scheduler import Engine
from mlx_mtp.models.target import Target
from mlx_mtp.engine.costs import CostModel, Costs, RoundTimes, speedup_bound
from mlx_mtp.request import GenerationRequest


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
def test_the_verify_forward_shares_weights_and_leaves_mlx_lm_model_unchanged(name):
    target = load_pair(name).target
    assert target.cpu_kernels  # on the CPU
    ours, theirs = target.decoder.layers[0].self_attn.q_proj, target.lm.model.layers[0].self_attn.q_proj
    assert type(ours) is MeasuredLinear and type(theirs) is nn.Linear
    assert ours.weight is theirs.weight  # no copy of any weight
    ours, theirs = target.decoder.layers[0], target.lm.model.layers[0]
    assert type(ours.input_layernorm) is cpu.CompiledRMSNorm and type(theirs.input_layernorm) is nn.RMSNorm
    assert type(ours.self_attn.rope) is cpu.CompiledRoPE and type(theirs.self_attn.rope) is nn.RoPE
    leaves = lambda m: [id(v) for _, v in nn.utils.tree_flatten(m.parameters())]  # noqa: E731
    assert leaves(target.decoder) == leaves(target.lm.model)


@pytest.mark.parametrize("name", ["e2b", "31b", "moe"])
@pytest.mark.parametrize("n", [1, 3, 5, 9])
def test_column_major_logits_equal_mlx_lm_logits(name, n):
    target = load_pair(name).target
    tokens = mx.array([prompt_of(12 + n, seed=n)])
    expected = target.model(tokens)  # mlx-lm's own forward and head
    cache = target.make_cache()
    target.hidden(tokens[:, :12], cache)
    logits = target.logits(target.hidden(tokens[:, 12:], cache))  # a verify of n tokens
    assert mx.allclose(logits, expected[:, 12:], atol=1e-4, rtol=1e-4)
    assert mx.array_equal(mx.argmax(logits, -1), mx.argmax(expected[:, 12:], -1))


def tiny_gemma3() -> nn.Module:
    """A random Gemma 3 text model (the embedded target's architecture) with norm weights
    away from zero: its norms scale by 1 + weight."""
    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
                                 num_attention_heads=4, head_dim=16, num_key_value_heads=1, vocab_size=512,
                                 sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=16)
    model = gemma3_text.Model(args)
    model.update(tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(len(p.shape))) * 0.3, model.parameters()))
    return model


def hidden_states(target: Target) -> list:
    """Hidden states of a prompt read in two chunks, then verify-sized forwards, for one row
    and for two rows at different positions (rope at an array of offsets)."""
    tokens = mx.array([prompt_of(40, seed=5)])
    cache = target.make_cache()
    out = [target.hidden(tokens[:, :30], cache), target.hidden(tokens[:, 30:], cache)]
    out += [target.hidden(mx.array([[7] * n]), cache) for n in (1, 2, 5)]
    cache = target.make_cache(2)
    out.append(target.hidden(mx.concatenate([tokens[:, :20]] * 2), cache))
    for c in cache:
        c.trim_rows([0, 3])
    out.append(target.hidden(mx.array([[9, 8, 7], [6, 5, 4]]), cache))
    return out


@pytest.mark.parametrize("name", ["gemma3", "e2b", "31b", "moe"])
def test_compiled_norms_and_rope_give_the_same_bits(name, monkeypatch):
    model = tiny_gemma3() if name == "gemma3" else load_pair(name).target.model
    compiled = hidden_states(Target(model))
    monkeypatch.setattr(cpu, "COMPILED", {})  # column-major linears only
    plain = hidden_states(Target(model))
    assert all(mx.array_equal(a, b) for a, b in zip(compiled, plain))


def test_a_lone_row_is_repeated_for_the_product_and_keeps_its_bits():
    weight = mx.random.normal((4096, 64))
    x = mx.random.normal((1, 64))
    one = products.compute("column", x, weight)
    two = products.compute("column2", x, weight)
    assert two.shape == (1, 4096) and mx.array_equal(one, two)
    assert mx.allclose(two, x @ weight.T, atol=1e-4)
    rows = mx.random.normal((3, 64))  # more than one row: the plain column product
    assert mx.array_equal(products.compute("column2", rows, weight), products.compute("column", rows, weight))


@pytest.mark.parametrize("way", products.WAYS)
def test_a_measured_linear_with_bias_equals_linear_whichever_way_runs(way, monkeypatch):
    linear = nn.Linear(6, 4, bias=True)
    x = mx.random.normal((2, 3, 6))
    measured = for_cpu(linear)
    assert type(measured) is MeasuredLinear and type(linear) is nn.Linear
    monkeypatch.setattr(products, "_chosen", {(4, 6): [way] * len(products.ROW_COUNTS)})
    assert mx.allclose(measured(x), linear(x), atol=1e-6)


def test_per_row_clustered_head_equals_one_batched_gather():
    head = ClusteredHead(hidden_size=8, vocab_size=64, num_centroids=8, top_k=3)
    head.token_ordering = mx.random.permutation(64).astype(mx.int32)
    embedding = nn.Embedding(64, 8)
    h = mx.random.normal((5, 8))
    out = head(h, embedding)
    rows = embedding(out.ids)  # [B, C, H]
    assert mx.allclose(out.logits, (rows @ h[:, :, None])[..., 0], atol=1e-5)


def test_long_verify_stays_exact_with_measured_products():
    # 16 drafts a round: a 17-token verify forward, past any small-M kernel switch.
    pair = load_pair("31b")
    prompt = prompt_of(40, seed=3)
    expected = plain_greedy(pair.target.model, prompt, 60)
    oracle = ContinuationProposer([prompt + expected], noise=0.05)
    assert mlx_mtp.generate(pair, prompt, max_tokens=60, num_draft_tokens=16, proposer=oracle).tokens == expected


def test_bound_for_a_fixed_draft_length_is_tau_t1_over_the_round_cost():
    costs = Costs(target=[0.10, 0.11, 0.12, 0.13], draft_step=0.01)
    stats = Stats(drafts=[[5, 6]] * 4, accepted=[2, 1, 0, 1], sources=["mtp"] * 4, committed=[3, 2, 1, 2])
    tau = 2.0
    assert speedup_bound(costs, stats) == pytest.approx(tau * 0.10 / (0.12 + 2 * 0.01))
    # Lookup rounds pay no drafter steps; plain rounds cost T(1) for their one token.
    stats = Stats(drafts=[[5, 6], []], accepted=[2, 0], sources=["ngram", "none"], committed=[3, 1])
    assert speedup_bound(costs, stats) == pytest.approx(4 * 0.10 / (0.12 + 0.10))
    long = Stats(drafts=[[5] * 4], accepted=[4], sources=["mtp"], committed=[5])
    assert speedup_bound(costs, long) is None  # T(5) was not measured
    # Where plain mlx-lm's own step was measured, tokens count at its cost, not at our T(1).
    costs.plain = 0.15
    assert speedup_bound(costs, stats) == pytest.approx(4 * 0.15 / (0.12 + 0.10))


def test_round_times_disagree_only_over_a_full_window_by_a_wide_margin():
    times = RoundTimes()
    assert not any(times.disagree(0.08, 0.1) for _ in range(3 * times.WINDOW))  # noise, not spoilt costs
    times = RoundTimes()
    assert not any(times.disagree(0.15, 0.1) for _ in range(3 * times.WINDOW))  # 1.5x: a busy moment
    # Faster rounds take over the median of the window after half of it.
    assert [times.disagree(0.01, 0.1) for _ in range(times.WINDOW // 2 + 1)][-2:] == [False, True]
    times = RoundTimes()
    assert not any(times.disagree(0.01, 0.1) for _ in range(times.WINDOW - 1))
    assert times.disagree(0.01, 0.1)  # the window is full, the median 10x off
    assert not times.disagree(0.01, 0.1)  # and starts over


def test_costs_from_a_busy_moment_are_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    target, drafter = PAIRS["31b"]
    pair = mlx_mtp.load(str(FIXTURES / target), str(FIXTURES / drafter))
    costs = CostModel.of(pair)
    costs.measured = {1: Costs([10.0] * 5, 1.0)}  # seconds: a forward here takes milliseconds
    prompt = prompt_of(10, seed=4)
    expected = plain_greedy(pair.target.model, prompt, RoundTimes.WINDOW + 10)
    wrong = ContinuationProposer([], noise=1.0)  # wrong drafts: one token a round
    out = mlx_mtp.generate(pair, prompt, max_tokens=RoundTimes.WINDOW + 10, proposer=wrong)
    assert out.tokens == expected
    # Found out after one window of rounds, but never measured between two tokens of a stream:
    assert costs.measured[1].target[0] == 10.0 and costs.stale == {1}
    stream = mlx_mtp.stream_generate(pair, prompt, max_tokens=4, proposer=wrong)
    next(stream)  # the next generation's first token comes after the new measurement
    assert costs.measured[1].target[0] < 1.0 and not costs.stale
    assert [t for r in stream for t in r.tokens] == expected[1:4]
    on_disk = json.loads((tmp_path / "costs.json").read_text())
    assert asdict(costs.measured[1]) in on_disk.values()


def test_stale_costs_wait_while_a_row_is_streaming(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    target, drafter = PAIRS["31b"]
    pair = mlx_mtp.load(str(FIXTURES / target), str(FIXTURES / drafter))
    spoilt = Costs([10.0] * 5, 1.0)
    costs = CostModel.of(pair)
    costs.measured, costs.stale = {1: spoilt}, {1}
    engine = Engine(pair)
    row = engine.add(GenerationRequest(prompt_of(6, seed=1), max_tokens=8))
    assert costs.measured[1] is spoilt  # queued, not started
    assert [len(u.tokens) for u in engine.step()] == [1]  # measured first, then read, then its first token
    assert costs.measured[1].target[0] < 1.0 and not costs.stale
    costs.measured, costs.stale = {1: spoilt}, {1}
    engine.step()  # the row streams: no pause between its tokens
    assert costs.measured[1] is spoilt and costs.stale == {1}
    engine.remove(row)
