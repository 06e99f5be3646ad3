"""Checkpoints as Mac users have them: the fixtures converted by mlx_vlm.convert and
mlx_lm.convert at 4-bit, 8-bit and mixed precision (scripts/convert_fixtures.py)."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import load_model

import mlx_mtp
from conftest import FIXTURES, ContinuationProposer, plain_greedy, prompt_of
from mlx_mtp.checkpoints.loading import LoadError

CONVERTED = FIXTURES / "converted"
TARGETS = [f"{converter}_{recipe}" for converter in ("vlm", "lm") for recipe in ("4bit", "8bit", "mixed")]
DRAFTER = FIXTURES / "drafter_dense"  # pairs with target_31b, whose weights target_mm shares


def mlx_lm_model(path):
    """The converted model as mlx-lm alone loads it. The fixtures' gemma4 config has
    `vocab_size` only in its text_config (transformers 5.20 writes it there; published
    configs have 262144 at the top level, mlx-lm's default), so it is passed in."""
    config = json.loads((path / "config.json").read_text())
    vocab = {"vocab_size": config["text_config"]["vocab_size"]} if "text_config" in config else {}
    return load_model(path, model_config=vocab)[0]


@pytest.fixture(scope="module", params=TARGETS)
def converted(request):
    path = CONVERTED / request.param
    return request.param, path, mlx_mtp.load(str(path), str(DRAFTER)), mlx_lm_model(path)


def test_the_converters_quantized_what_users_get(converted):
    name, path, pair, _ = converted
    quantization = json.loads((path / "config.json").read_text())["quantization"]
    assert quantization["bits"] == {"4bit": 4, "8bit": 8, "mixed": 4}[name.split("_")[1]]
    layers = pair.target.lm.model.layers
    assert isinstance(layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(pair.target.lm.model.embed_tokens, nn.QuantizedEmbedding)
    if name.endswith("mixed"):  # the recipe's 6-bit layers beside 4-bit ones
        assert {layer.mlp.down_proj.bits for layer in layers} == {4, 6}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_equals_plain_mlx_lm_on_the_converted_model(converted, k):
    name, _, pair, plain = converted
    drafts = "hybrid"  # the pair's own proposer for the first prompt, the drafter alone after it
    for prompt in (prompt_of(5, seed=1), prompt_of(27, seed=2)):
        expected = plain_greedy(plain, prompt, 24)
        out = mlx_mtp.generate(pair, prompt, max_tokens=24, num_draft_tokens=k, proposer=drafts)
        assert out.tokens == expected
        assert out.stats.drafted_tokens > 0 and 0 <= out.stats.acceptance_rate <= 1
        # Drafts that are often right: long accepted runs through the quantized verify.
        oracle = ContinuationProposer([prompt + expected], noise=0.3, seed=k)
        out = mlx_mtp.generate(pair, prompt, max_tokens=24, num_draft_tokens=k, proposer=oracle)
        drafts = "mtp"
        assert out.tokens == expected and sum(out.stats.accepted) > 0


def test_vlm_conversions_keep_the_vision_tower_unquantized_and_load_without_it():
    index = json.loads((CONVERTED / "vlm_4bit" / "model.safetensors.index.json").read_text())["weight_map"]
    vision = [k for k in index if k.startswith("vision_tower.")]
    assert vision and not any(k.endswith(".scales") for k in vision)
    pair = mlx_mtp.load(str(CONVERTED / "vlm_4bit"), str(DRAFTER))
    assert "vision_tower" not in pair.target.model  # text only: mlx-lm's gemma4 drops it


@pytest.mark.parametrize("drafter", ["drafter_vlm_4bit", "drafter_vlm_8bit"])
@pytest.mark.parametrize("target", ["lm_4bit", "../target_31b"])
def test_a_drafter_quantized_by_mlx_vlm_loads_and_stays_exact(drafter, target):
    pair = mlx_mtp.load(str(CONVERTED / target), str(CONVERTED / drafter))
    assert isinstance(pair.drafter.pre_projection, nn.QuantizedLinear)
    prompt = prompt_of(19, seed=3)
    expected = plain_greedy(pair.target.model, prompt, 24)
    for k in (1, 3):
        out = mlx_mtp.generate(pair, prompt, max_tokens=24, num_draft_tokens=k)
        assert out.tokens == expected and out.stats.drafted_tokens > 0


def test_conversions_the_converters_refuse_are_recorded():
    log = {entry["output"]: entry["result"] for entry in json.loads((CONVERTED / "conversions.json").read_text())}
    assert log["drafter_lm_4bit"] == "ValueError: Model type gemma4_assistant not supported."
    assert "Expected shape (1024, 64)" in log["as_written_lm"]  # transformers 5.20's config as written
    assert all(log[name] == "ok" for name in TARGETS + ["drafter_vlm_4bit", "drafter_vlm_8bit"])


def test_a_quantized_drafter_with_missing_tensors_fails_in_one_line(tmp_path):
    drafter = tmp_path / "drafter"
    shutil.copytree(CONVERTED / "drafter_vlm_4bit", drafter)
    weights = mx.load(str(drafter / "model.safetensors"))
    del weights["pre_projection.scales"]
    mx.save_safetensors(str(drafter / "model.safetensors"), weights, metadata={"format": "mlx"})
    with pytest.raises(LoadError) as e:
        mlx_mtp.load(str(FIXTURES / "target_31b"), str(drafter))
    assert "cannot load weights" in str(e.value) and "pre_projection" in str(e.value)
    assert "\n" not in str(e.value)
