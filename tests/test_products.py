"""Choosing the product kernel per weight shape and row count (models/products.py)."""

import json
import logging

import mlx.core as mx
import pytest

import mlx_mtp
from conftest import load_pair, plain_greedy, prompt_of
from mlx_mtp.engine import costs
from mlx_mtp.models import products

HEAD, LAYER = (96, 8), (16, 8)


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts from no choice and leaves none behind."""
    monkeypatch.setattr(products, "_chosen", {})


def injected(fastest):
    """A timer where `fastest(shape, rows)` is the way that wins, by a margin."""

    def timer(way, x, weight):
        return 1.0 if way == fastest(tuple(weight.shape), x.shape[0]) else 2.0

    return timer


def test_each_shape_and_row_count_takes_the_way_that_measured_fastest():
    # As measured on an Intel Xeon: x @ W.T wins for 2-3 rows of the head; column otherwise.
    def fastest(shape, rows):
        if shape == HEAD and rows in (2, 3):
            return "row"
        return "column2" if rows == 1 else "column"

    weights = {HEAD: mx.zeros(HEAD), LAYER: mx.zeros(LAYER)}
    chosen = products.measure(weights, injected(fastest))
    assert chosen[HEAD][:4] == ["column2", "row", "row", "column"] and chosen[LAYER][:3] == ["column2", "column", "column"]
    products.use(chosen)
    assert [products.way_for(HEAD, n) for n in (1, 2, 3, 4, 7, 500)] == ["column2", "row", "row", "column", "column", "column"]
    assert products.way_for((5, 5), 3) == products.DEFAULT  # a shape never measured


def test_a_row_count_between_two_measured_takes_the_lower_ones_choice():
    products.use({HEAD: ["column"] * 6 + ["row"] + ["column"] * (len(products.ROW_COUNTS) - 7)})
    assert products.ROW_COUNTS[5:8] == (6, 8, 10)
    assert [products.way_for(HEAD, n) for n in (6, 7, 8, 9, 10)] == ["column", "column", "row", "row", "column"]


def test_every_way_computes_the_same_product():
    x, w = mx.random.normal((3, 8)), mx.random.normal((16, 8))
    for rows in (1, 3):
        for way in products.ways_at(rows):
            assert mx.allclose(products.compute(way, x[:rows], w), x[:rows] @ w.T, atol=1e-5)


def test_a_choice_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        products.use({HEAD: ["row"] * 3})
    with pytest.raises(ValueError, match="does not fit"):
        products.use({HEAD: ["diagonal"] * len(products.ROW_COUNTS)})


def test_choices_are_remembered_per_machine_and_measured_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    pair = load_pair("e2b")
    calls = []
    real = products.measure

    def counted(weights, timer=products.time_way):
        calls.append(sorted(weights))
        return real(weights, injected(lambda shape, rows: "row"))

    monkeypatch.setattr(products, "measure", counted)
    costs.choose_products(pair)
    costs.choose_products(pair)  # remembered: not measured again
    assert len(calls) == 1 and products.way_for(calls[0][0], 3) == "row"
    (key,) = [k for k in json.loads((tmp_path / "costs.json").read_text()) if k.startswith("products/")]
    assert products.cpu_model() in key and mx.__version__ in key
    monkeypatch.setattr(products, "machine_key", lambda: "another CPU|mkl|mlx 0.0")
    costs.choose_products(pair)
    assert len(calls) == 2
    # Remembered for other row counts (an older build): measured again, not trusted.
    path = tmp_path / "costs.json"
    known = json.loads(path.read_text())
    (key,) = [k for k in known if "another CPU" in k]
    known[key] = {shape: ways[:3] for shape, ways in known[key].items()}
    path.write_text(json.dumps(known))
    costs.choose_products(pair)
    assert len(calls) == 3 and len(json.loads(path.read_text())[key][next(iter(known[key]))]) == len(products.ROW_COUNTS)


def test_a_failed_measurement_keeps_the_default(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))

    def fails(weights, timer=None):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(products, "measure", fails)
    pair = load_pair("e2b")
    with caplog.at_level(logging.WARNING):
        costs.choose_products(pair)
    assert "out of memory" in caplog.text
    assert products._chosen and all(ways == [products.DEFAULT] * len(products.ROW_COUNTS)
                                    for ways in products._chosen.values())
    caplog.clear()
    costs.choose_products(pair)  # the default is remembered: no measurement at every run
    assert "out of memory" not in caplog.text


def test_an_unreadable_costs_file_is_measured_again_not_an_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    (tmp_path / "costs.json").write_text('{"half a fi')
    pair = load_pair("e2b")
    with caplog.at_level(logging.WARNING):
        assert costs.load_or_measure(pair, pair.default_draft_tokens).target[0] > 0
    assert "unreadable" in caplog.text
    known = json.loads((tmp_path / "costs.json").read_text())
    key = costs.shape_key(pair, pair.default_draft_tokens)
    known[key] = {"target": [1.0], "no such field": 2}  # a damaged entry: measured again
    (tmp_path / "costs.json").write_text(json.dumps(known))
    assert costs.load_or_measure(pair, pair.default_draft_tokens).target[0] < 1.0


@pytest.mark.parametrize("name", ["e2b", "31b"])
def test_greedy_ids_are_the_same_whichever_way_runs(name):
    pair = load_pair(name)
    prompt = prompt_of(20, seed=7)
    expected = plain_greedy(pair.target.model, prompt, 40)
    shapes = costs.product_weights(pair.target)
    for way in ("row", "column", "column2"):
        products.use({shape: [way] * len(products.ROW_COUNTS) for shape in shapes})
        assert mlx_mtp.generate(pair, prompt, max_tokens=40, num_draft_tokens=3).tokens == expected, way


def test_seeded_rows_keep_their_solo_tokens_when_batches_run_another_way():
    """A row alone (K = 2: 3 rows a forward) runs one way, in a batch of three (9 rows)
    another: the tokens stay the same."""
    pair = load_pair("e2b")
    shapes = costs.product_weights(pair.target)
    ways = ["row" if n <= 4 else "column" for n in products.ROW_COUNTS]
    products.use({shape: ways for shape in shapes})
    prompts = [prompt_of(9 + i, seed=30 + i) for i in range(3)]
    kwargs = dict(max_tokens=24, num_draft_tokens=2, temperature=1.0)
    alone = [mlx_mtp.generate(pair, p, seed=s, **kwargs).tokens for s, p in enumerate(prompts)]
    together = mlx_mtp.batch_generate(pair, prompts, seed=[0, 1, 2], **kwargs)
    assert [r.tokens for r in together] == alone
