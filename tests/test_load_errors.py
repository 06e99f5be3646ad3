"""Pairs that cannot run fail at load time with one clear line."""

import json
import shutil

import pytest

import mlx_mtp
from conftest import FIXTURES


def copy_fixture(name, tmp_path):
    return shutil.copytree(FIXTURES / name, tmp_path / name)


def load_error(target, drafter) -> str:
    with pytest.raises(mlx_mtp.LoadError) as e:
        mlx_mtp.load(str(target), str(drafter))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_mismatched_hidden_size_names_both_values():
    message = load_error(FIXTURES / "target_31b", FIXTURES / "drafter_bad_hidden")
    assert "backbone_hidden_size 48" in message and "hidden_size 64" in message


def test_mismatched_vocab_names_both_values(tmp_path):
    drafter = copy_fixture("drafter_dense", tmp_path)
    config = json.loads((drafter / "config.json").read_text())
    config["text_config"]["vocab_size"] = 1024
    (drafter / "config.json").write_text(json.dumps(config))
    message = load_error(FIXTURES / "target_31b", drafter)
    assert "1024" in message and "512" in message


def test_missing_weights(tmp_path):
    target = copy_fixture("target_31b", tmp_path)
    (target / "model.safetensors").unlink()
    assert "no model*.safetensors" in load_error(target, FIXTURES / "drafter_dense")


def test_corrupt_weights(tmp_path):
    drafter = copy_fixture("drafter_dense", tmp_path)
    (drafter / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert "cannot load weights" in load_error(FIXTURES / "target_31b", drafter)


def test_weights_missing_a_tensor(tmp_path):
    import mlx.core as mx

    drafter = copy_fixture("drafter_dense", tmp_path)
    weights = mx.load(str(drafter / "model.safetensors"))
    weights.pop("pre_projection.weight")
    mx.save_safetensors(str(drafter / "model.safetensors"), weights)
    assert "pre_projection" in load_error(FIXTURES / "target_31b", drafter)


def test_unknown_model_type(tmp_path):
    target = copy_fixture("target_31b", tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "llama"
    (target / "config.json").write_text(json.dumps(config))
    assert "unsupported target model_type 'llama'" in load_error(target, FIXTURES / "drafter_dense")


def test_target_passed_as_drafter():
    assert "not a Gemma 4 assistant drafter" in load_error(FIXTURES / "target_31b", FIXTURES / "target_moe")


def test_missing_directory(tmp_path):
    assert "no such directory" in load_error(tmp_path / "nope" / "x" / "y", FIXTURES / "drafter_dense")


def test_missing_config(tmp_path):
    target = copy_fixture("target_31b", tmp_path)
    (target / "config.json").unlink()
    assert "no config.json" in load_error(target, FIXTURES / "drafter_dense")


def test_text_prompt_without_tokenizer_is_refused(tmp_path):
    target = copy_fixture("target_31b", tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / f).unlink()
    pair = mlx_mtp.load(str(target), str(FIXTURES / "drafter_dense"))
    assert pair.tokenizer is None
    with pytest.raises(mlx_mtp.LoadError, match="list of token ids"):
        mlx_mtp.generate(pair, "hello", max_tokens=3)
    assert len(mlx_mtp.generate(pair, [5, 6, 7], max_tokens=3).tokens) == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": -0.5}, "top_p"),
        ({"max_tokens": -2}, "or -1 for no limit"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"num_draft_tokens": -1}, "num_draft_tokens"),
    ],
)
def test_bad_generation_settings(kwargs, match):
    pair = mlx_mtp.load(str(FIXTURES / "target_31b"), str(FIXTURES / "drafter_dense"))
    with pytest.raises(ValueError, match=match):
        mlx_mtp.generate(pair, [5, 6, 7], **kwargs)


def test_prompt_longer_than_context_and_empty_prompt():
    pair = mlx_mtp.load(str(FIXTURES / "target_31b"), str(FIXTURES / "drafter_dense"))
    with pytest.raises(ValueError, match="context is 4096"):
        mlx_mtp.generate(pair, [5] * 4096, max_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        mlx_mtp.generate(pair, [], max_tokens=3)
