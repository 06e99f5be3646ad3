"""The shipped drafter of the embedded pair (Gemma 3 270M + our MTP drafter).

The fast tests read only the drafter's own files; the slow ones load the real target.
"""

import json

import mlx.core as mx
import pytest

import mlx_mtp
from conftest import plain_greedy
from mlx_mtp import conversation as chat
from mlx_mtp.checkpoints.loading import load_drafter
from mlx_mtp.checkpoints.registry import PACKAGE, default_pair

DRAFTER = PACKAGE / "assets" / "gemma-3-270m-drafter"
MAX_BYTES = 25 * 1024 * 1024
VOCAB = 262144


@pytest.fixture(scope="module")
def weights():
    return mx.load(str(DRAFTER / "model.safetensors"))


@pytest.fixture(scope="module")
def config():
    return json.loads((DRAFTER / "config.json").read_text())


def test_shipped_drafter_fits_the_size_budget():
    size = sum(f.stat().st_size for f in DRAFTER.iterdir() if f.is_file())
    assert size <= MAX_BYTES


def test_shipped_drafter_carries_the_gemma_notice():
    assert "Gemma Terms of Use" in (DRAFTER / "NOTICE").read_text()


def test_shipped_drafter_config_shares_the_target_embedding(config):
    assert config["model_type"] == "gemma4_assistant"
    assert config["shares_target_embedding"] is True
    assert config["use_ordered_embeddings"] is True
    assert config["backbone_hidden_size"] == config["text_config"]["hidden_size"] == 640
    assert config["text_config"]["vocab_size"] == VOCAB
    assert VOCAB % config["num_centroids"] == 0  # equal-sized clusters


def test_shipped_token_ordering_is_a_permutation_of_the_vocabulary(weights):
    ordering = weights["masked_embedding.token_ordering"]
    assert ordering.dtype == mx.int32 and ordering.shape == (VOCAB,)
    assert mx.array_equal(mx.sort(ordering), mx.arange(VOCAB)).item()


def test_shipped_weights_have_every_drafter_tensor_and_no_embedding(weights, config):
    n = config["text_config"]["num_hidden_layers"]
    required = ["pre_projection.weight", "post_projection.weight", "model.norm.weight",
                "masked_embedding.centroids.weight", "masked_embedding.token_ordering"]
    for i in range(n):
        required += [f"model.layers.{i}.self_attn.{p}.weight" for p in ("q_proj", "o_proj", "q_norm")]
        required += [f"model.layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    assert set(required) <= set(weights)
    assert not any("embed_tokens" in k for k in weights)
    assert weights["masked_embedding.centroids.weight"].shape == (config["num_centroids"], 640)


def test_shipped_drafter_loads_without_the_target():
    drafter = load_drafter(DRAFTER)  # strict: every parameter present, none extra
    assert drafter.args.shares_target_embedding
    assert drafter.layer_types == ["sliding_attention", "full_attention"]


def test_embedded_pair_is_the_default():
    entry = default_pair()
    assert entry is not None and entry.alias == "gemma-3-270m"
    assert entry.drafter_path() == str(DRAFTER)


@pytest.fixture(scope="module")
def pair():
    return mlx_mtp.load("gemma-3-270m")


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    '{"name": "Ada", "languages": [',
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_shipped_pair_greedy_matches_plain_mlx_lm(pair, prompt):
    ids = pair.tokenizer.encode(prompt)
    expected = plain_greedy(pair.target.model, ids, 40, pair.eos_ids)
    got = mlx_mtp.generate(pair, ids, max_tokens=40)
    assert got.tokens == expected


@pytest.mark.slow
def test_shipped_drafter_alone_greedy_matches_plain_mlx_lm(pair):
    ids = pair.tokenizer.encode(PROMPTS[0])
    expected = plain_greedy(pair.target.model, ids, 40, pair.eos_ids)
    got = mlx_mtp.generate(pair, ids, max_tokens=40, num_draft_tokens=3, proposer="mtp")
    assert got.tokens == expected
    assert got.stats.drafted_tokens > 0 and got.stats.by_source.keys() == {"mtp"}


@pytest.mark.slow
def test_embedded_chat_answers_briefly_through_the_dialogue(pair):
    # A base model: through Gemma's chat template it repeats the question until the limit.
    assert pair.chat == "dialogue"
    conversation = chat.Conversation(pair)
    replies = []
    for question in ["What is the capital of France?", "Who painted the Mona Lisa?"]:
        chunks = list(conversation.reply(question, max_tokens=64))
        replies.append(("".join(c.text for c in chunks).strip(), chunks[-1].finish_reason))
    assert replies == [("Paris.", "stop"), ("Leonardo da Vinci.", "stop")]  # ended at the next turn
    assert conversation.replies[1].prompt_tokens < 20  # the second turn read only its own text
