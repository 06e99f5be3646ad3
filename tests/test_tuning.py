"""Choosing K from measured costs and live acceptance."""

import pytest

import mlx_mtp
from conftest import ContinuationProposer, load_pair, plain_greedy, prompt_of
from mlx_mtp.engine.stats import Stats
from mlx_mtp.engine.costs import CostModel, Costs, best_k, choose_k, conditional_acceptance

GPU = Costs(target=[1.0, 1.02, 1.04, 1.06, 1.08, 1.1, 1.12, 1.14, 1.16], draft_step=0.03)
CPU = Costs(target=[1.0, 1.18, 1.28, 1.91, 1.99, 2.06, 2.4, 2.69, 3.0], draft_step=0.04)


def test_cheap_verification_and_good_drafts_draft_long():
    assert best_k(GPU, [[0.8] * 8]) == 8


def test_cpu_costs_stop_before_the_expensive_jump():
    # Verifying 4+ tokens costs ~1.9x one token on this CPU: K stays below 3.
    assert best_k(CPU, [[0.7] * 8]) == 2


def test_poor_acceptance_turns_speculation_off():
    assert best_k(CPU, [[0.05] * 8]) == 0
    assert best_k(GPU, [[0.05] * 8]) == 0


def test_conditional_acceptance_from_rounds():
    drafts = [[1, 2, 3]] * 10
    accepted = [3] * 5 + [0] * 5  # position 1: 5 of 10; positions 2, 3: all that got there
    a = conditional_acceptance(drafts, accepted, 3)
    # Each shrunk (4 rounds' weight) towards 1/2, then towards the position before it.
    assert a[0] == pytest.approx((5 + 2) / 14)
    assert a[1] == pytest.approx((5 + 4 * a[0]) / 9) and a[2] == pytest.approx((5 + 4 * a[1]) / 9)


def test_a_position_never_drafted_is_expected_to_do_as_well_as_the_one_before():
    # A lookup right 9 times in 10 at two drafts: the third is tried, not written off at 1/2.
    stats = Stats(drafts=[[5, 6]] * 30, accepted=[2] * 27 + [0] * 3, sources=["ngram"] * 30)
    a = conditional_acceptance(stats.drafts, stats.accepted, 3)
    assert a[2] == pytest.approx(a[1]) and a[1] > 0.9
    # A third draft costs 19% more here: worth it at a_3 ~ a_2, not at a_3 = 1/2.
    costs = Costs(target=[1.0, 1.0, 1.05, 1.25], draft_step=0.0)
    assert choose_k(costs, [stats], ["ngram"], 3) == 3
    assert best_k(costs, [a[:2] + [0.5]]) == 2


def test_plain_rounds_are_probed_now_and_then():
    stats = Stats(drafts=[[]] * 8, accepted=[0] * 8, sources=["none"] * 8)
    assert choose_k(CPU, [stats], ["mtp"], 4) == 1


def test_each_source_gets_its_own_draft_length():
    # The n-gram lookup is nearly always right here, the drafter nearly never: the lookup's
    # rounds draft (and pay no drafter steps), the drafter's rounds do not.
    rounds = 16
    stats = Stats(
        drafts=[[5, 6]] * rounds * 2,
        accepted=[2, 0] * rounds,
        sources=["ngram", "mtp"] * rounds,
    )
    assert choose_k(CPU, [stats], ["ngram"], 2) == 2
    assert choose_k(CPU, [stats], ["mtp"], 2) == 0
    pooled = Stats(drafts=stats.drafts, accepted=stats.accepted, sources=["mtp"] * rounds * 2)
    assert choose_k(CPU, [pooled], ["mtp"], 2) == 2  # one profile for both: drafter rounds draft too


def test_auto_draft_length_stays_exact():
    pair = load_pair("31b")
    prompt = prompt_of(20, seed=5)
    expected = plain_greedy(pair.target.model, prompt, 40)
    oracle = ContinuationProposer([prompt + expected], noise=0.1)
    out = mlx_mtp.generate(pair, prompt, max_tokens=40, proposer=oracle)  # num_draft_tokens=None: auto
    assert out.tokens == expected
    assert len(CostModel.of(pair).measured[1].target) == pair.default_draft_tokens + 1
    assert all(len(d) <= pair.default_draft_tokens for d in out.stats.drafts)
