"""Train the MTP drafter of the embedded pair (Gemma 3 270M) from the target's own outputs.

Nothing is downloaded: the data are the target's continuations of its prompts, and the
prompts are templated seeds (prose, lists, Q&A, JSON, tables, stories, code, chat turns) or
text the target samples itself from BOS, as is or inside a chat turn. Three stages:

    python scripts/train_drafter.py data --out /tmp/drafter-data --max-batches 16
    python scripts/train_drafter.py data --prompts self --out /tmp/drafter-self --batches 16 --seed 1
    python scripts/train_drafter.py train --data /tmp/drafter-data /tmp/drafter-self --minutes 50 \
        --out mlx_mtp/checkpoints/assets/gemma-3-270m-drafter
    python scripts/train_drafter.py data --prompts self --out /tmp/drafter-self2 --batches 20 --seed 2
    python scripts/train_drafter.py train --init mlx_mtp/checkpoints/assets/gemma-3-270m-drafter \
        --data /tmp/drafter-self2 --minutes 50 --lr 1.5e-4 --out mlx_mtp/checkpoints/assets/gemma-3-270m-drafter
    python scripts/train_drafter.py data --prompts self --out /tmp/drafter-self3 --batches 20 --seed 3
    python scripts/train_drafter.py train --init mlx_mtp/checkpoints/assets/gemma-3-270m-drafter --data /tmp/drafter-self3 \
        --minutes 45 --lr 1.5e-4 --lookup-weight 0.5 --val-seqs 64 --out mlx_mtp/checkpoints/assets/gemma-3-270m-drafter
    python scripts/train_drafter.py eval  --drafter mlx_mtp/checkpoints/assets/gemma-3-270m-drafter

`data` samples B rows per batch (half greedy, half at temperature 0.8, EOS banned) and records
per position the token, the target's post-norm hidden state, its greedy argmax (the token
greedy verification accepts) and the KV of its last sliding and last full layer.

`train` builds the drafter (model_type gemma4_assistant, shares_target_embedding): two
query-only layers [sliding, full] initialised from the target's last sliding and last full
layer, a clustered head whose equal-size clusters come from recursive median splits of the
target's embedding rows. Loss: a K-step rollout (`--rollout`, 2) with the drafter's own carry
at a constant query position (exactly as MTPProposer runs it), cross-entropy over a candidate
set (the most frequent greedy tokens plus the batch's labels), plus a cross-entropy on the
centroid logits toward the label's cluster. Step k > 1 is trained only where the data's token
equals the target's greedy token (the condition under which its draft is verified).
`--lookup-weight` weighs down round starts where the hybrid proposer would take the n-gram
lookup's proposal instead of the drafter's.

`eval` measures first-draft acceptance of the drafter alone and of the hybrid proposer with
greedy decoding on held-out prompts (EVAL_PROMPTS as plain text, or with `--prompts bench`
mlx-mtp bench's built-in prompts as a chat turn; neither is used for training), and checks the
output equals plain mlx-lm greedy decoding.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import mlx_mtp  # noqa: F401  (before mlx: preloads MKL on Linux)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_mtp.models.cache import BatchCache
from mlx_mtp.bench.runner import encode_prompt, load_prompts
from mlx_mtp.checkpoints.embedded import GEMMA_NOTICE, ensure_target
from mlx_mtp.checkpoints.pair import Pair
from mlx_mtp.checkpoints.loading import load_models
from mlx_mtp.decoding.proposers import NGramIndex
from mlx_mtp.models.target import SLIDING

EOS_IDS = (1, 106)

# ---------------------------------------------------------------------------------------
# Seed prompts (training) and held-out prompts (evaluation only)

TOPICS = [
    "the ocean", "volcanoes", "the Roman Empire", "photosynthesis", "electric cars", "coffee",
    "the moon landing", "honey bees", "the internet", "jazz music", "mountain climbing",
    "the human heart", "chess", "rainforests", "ancient Egypt", "solar panels", "bread baking",
    "the stock market", "whales", "the printing press", "glaciers", "vaccines", "trains",
    "the Renaissance", "black holes", "gardening", "the French Revolution", "robots",
    "earthquakes", "the Olympic Games", "penguins", "democracy", "music theory", "deserts",
    "quantum physics", "football", "cooking pasta", "the water cycle", "birds migration",
    "the Great Wall of China", "machine learning", "bicycles", "friendship", "the brain",
]
NAMES = ["Alice", "Bob", "Maria", "Kenji", "Fatima", "Lucas", "Priya", "Tom", "Elena", "Omar"]
PLACES = ["Paris", "Tokyo", "a small village", "the forest", "Mars", "a lighthouse", "Cairo",
          "a busy market", "the library", "an old castle", "New York", "a submarine"]
THINGS = ["apples", "books", "cities", "planets", "tools", "animals", "countries", "colors",
          "programming languages", "instruments", "rivers", "inventions", "sports", "fruits"]
CODE_TASKS = [
    "reverses a string", "computes the factorial of n", "checks if a number is prime",
    "sorts a list with bubble sort", "reads a file and counts its lines", "merges two dicts",
    "finds the maximum of a list", "computes fibonacci numbers", "parses a CSV line",
    "removes duplicates from a list", "counts words in a text", "converts celsius to fahrenheit",
    "implements binary search", "flattens a nested list", "validates an email address",
]
LANGS = ["Python", "JavaScript", "C", "Rust", "Go", "Java", "Bash"]

TEMPLATES = [
    "{Topic} is",
    "Here is a short essay about {topic}.\n\n",
    "Write a paragraph about {topic}.\n\n",
    "Once upon a time, in {place}, there lived",
    "{name} walked into {place} and",
    "Chapter 1\n\nThe morning {name} arrived in {place},",
    "Here is a list of {things}:\n1.",
    "Top 10 facts about {topic}:\n\n1.",
    "- {Things}\n-",
    "Q: What is {topic}?\nA:",
    "Question: Why is {topic} important?\nAnswer:",
    "Q: Who was the first person to study {topic}?\nA:",
    "FAQ about {topic}\n\nQ:",
    '{{"name": "{name}", "city": "{place}", "interests": [',
    'Here is a JSON object describing {topic}:\n{{\n  "title":',
    '[{{"id": 1, "item": "{thing}", "price":',
    "| Name | Age | City |\n|------|-----|------|\n| {name} |",
    "| {Thing} | Description |\n|---|---|\n|",
    "```{lang}\n// A function that {task}\n",
    "def solve():\n    # {task}\n",
    "Write a {lang} function that {task}.\n\n```{lang_lower}\n",
    "import numpy as np\n\n\ndef",
    "class {Thing_singular}:\n    def __init__(self",
    "<start_of_turn>user\nTell me about {topic}.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nCan you explain {topic} simply?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWrite a short poem about {topic}.<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nGive me three tips for {topic}.<end_of_turn>\n<start_of_turn>model\n",
    "User: Hi! What do you know about {topic}?\nAssistant:",
    "{name}: Have you ever been to {place}?\n{name2}:",
    "Dear {name},\n\nI am writing to you about",
    "Recipe: {thing} salad\n\nIngredients:\n-",
    "The history of {topic} begins",
    "In this article, we will discuss {topic}. First,",
    "Step 1:",
    "Abstract. We study {topic} and",
    "Breaking news: {place} reports",
    "1 + 1 = 2\n2 + 2 = 4\n3 + 3 =",
    "Solve: {a} + {b} = ",
    "The year was {year}. {name}",
    "<html>\n<head>\n<title>{Topic}</title>\n",
    "SELECT name, age FROM users WHERE",
    "Translate to French: {topic}\nFrench:",
]

EVAL_PROMPTS = [  # held out: no template above produces these
    "The capital of France is",
    "Explain how a refrigerator keeps food cold.",
    "Here are five reasons to learn a second language:\n1.",
    "def quicksort(arr):\n",
    '{"user": {"id": 42, "name": "Ada Lovelace", "skills": [',
    "<start_of_turn>user\nWhat is the difference between weather and climate?<end_of_turn>\n<start_of_turn>model\n",
    "A train leaves the station at 3 pm travelling at 60 km/h. How far has it gone by 5 pm?",
    "The old lighthouse keeper looked out at the storm and",
    "| Planet | Moons |\n|---|---|\n| Earth | 1 |\n",
    "Summary of the meeting:\n-",
    "The main causes of the First World War were",
    "for (int i = 0; i < n; i++) {\n",
]


def _fill(template: str, rng: random.Random) -> str:
    topic, thing, lang = rng.choice(TOPICS), rng.choice(THINGS), rng.choice(LANGS)
    name, name2 = rng.sample(NAMES, 2)
    return template.format(
        topic=topic, Topic=topic[0].upper() + topic[1:], place=rng.choice(PLACES), name=name,
        name2=name2, things=thing, Things=thing.capitalize(), thing=thing, Thing=thing.capitalize(),
        Thing_singular=thing.capitalize().rstrip("s"), task=rng.choice(CODE_TASKS), lang=lang,
        lang_lower=lang.lower(), a=rng.randint(1, 999), b=rng.randint(1, 999),
        year=rng.randint(1500, 2100),
    )


def seed_prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add(_fill(rng.choice(TEMPLATES), rng))
    out = sorted(out)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------------------
# Stage 1: data from the target itself


def generate_batch(target, encoded, steps, temperature, greedy_rows):
    """Sample `steps` tokens after each prompt (token ids); returns one dict of arrays per row."""
    B = len(encoded)
    kinds = target.layer_types[: target.num_cached_layers]
    caches = [BatchCache(B, target.sliding_window if k == SLIDING else None) for k in kinds]
    lengths = [len(p) for p in encoded]
    longest = max(lengths)
    padded = mx.array([p + [0] * (longest - len(p)) for p in encoded])
    hidden = target.hidden(padded, caches)
    for c in caches:
        c.trim_rows([longest - n for n in lengths])
    last = hidden[mx.arange(B), mx.array(lengths) - 1][:, None]  # [B, 1, H]
    ban = mx.zeros((target.vocab_size,)).at[mx.array(EOS_IDS)].add(-1e9)
    hs, gs, xs = [], [], []
    for step in range(steps + 1):
        logits = target.logits(last)[:, 0].astype(mx.float32)
        greedy = mx.argmax(logits, axis=-1)
        # Rows [0, greedy_rows) decode greedily, the rest sample: each half pays only for its
        # own choice (sampling 262K logits per row is the costliest step here).
        parts = [mx.argmax(logits[:greedy_rows] + ban, axis=-1)] if greedy_rows else []
        if greedy_rows < B:
            parts.append(mx.random.categorical((logits[greedy_rows:] + ban) / temperature))
        token = mx.concatenate(parts)
        hs.append(last[:, 0].astype(mx.float16))
        gs.append(greedy)
        xs.append(token)
        if step == steps:
            break
        last = target.hidden(token[:, None], caches)
        mx.eval(last, hs[-1], gs[-1], xs[-1])
    H = np.array(mx.stack(hs, axis=1))  # [B, steps+1, H]: hidden at positions P-1 .. P+steps-1
    G = np.array(mx.stack(gs, axis=1))  # greedy at the same positions
    X = np.array(mx.stack(xs, axis=1))  # tokens at positions P .. P+steps
    sl, fl = target.shared_layer[SLIDING], target.shared_layer["full_attention"]
    rows = []
    for i in range(B):
        n = lengths[i] + steps  # positions fed to the target: 0 .. n-1
        kv = [np.array(caches[j].keys[i, 0, :n].astype(mx.float16)) for j in (sl, fl)]
        kv += [np.array(caches[j].values[i, 0, :n].astype(mx.float16)) for j in (sl, fl)]
        rows.append(
            dict(
                tokens=np.array(encoded[i] + X[i, :steps].tolist(), np.int32),  # positions 0..n-1
                prompt_len=lengths[i],
                hidden=H[i, :steps],  # hidden at positions P-1 .. n-2
                greedy=G[i, :steps + 1].astype(np.int32),  # greedy at positions P-1 .. n-1
                ks=kv[0], kf=kv[1], vs=kv[2], vf=kv[3],
            )
        )
    return rows


CHAT_WRAPPERS = [  # user turns around the target's own text: replies that quote the user
    "{text}", "Summarize this:\n\n{text}", "Rewrite this more clearly:\n\n{text}",
    "What does this mean?\n\n{text}", "Continue this text:\n\n{text}",
    "Translate this into English:\n\n{text}", "Fix any mistakes in this:\n\n{text}",
]


def self_prompts(pair, B: int, rng: random.Random) -> list:
    """B prompts seeded by the target itself: text it samples from BOS (T=1, 16-48 tokens),
    as is for the first and third quarter of the rows, wrapped in a chat turn for the second
    and fourth (rows [0, B/2) decode greedily, so each half gets both kinds)."""
    bos = pair.tokenizer.bos_token_id
    free = [r["tokens"][1:] for r in generate_batch(pair.target, [[bos]] * B, 48, 1.0, 0)]
    prompts = []
    for i, ids in enumerate(free):
        ids = ids[: rng.randint(16, 48)].tolist()
        if (i // (B // 4)) % 2 == 0:
            prompts.append([bos] + ids)
        else:
            turn = rng.choice(CHAT_WRAPPERS).format(text=pair.tokenizer.decode(ids).strip())
            prompts.append(encode_prompt(pair, turn, True))  # as the bench and chat send a user turn
    return prompts


def stage_data(args):
    target, _, tokenizer, eos = load_models(str(ensure_target()), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompts == "templates":
        prompts = seed_prompts(args.batches * args.batch_size, args.seed)
        (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    t0 = time.perf_counter()
    for b in range(min(args.batches, args.max_batches or args.batches)):
        path = out / f"batch_{b:03d}.npz"
        if path.exists():
            continue
        tic = time.perf_counter()
        mx.random.seed(args.seed * 1000 + b)  # per batch, so a resumed run makes the same data
        if args.prompts == "templates":
            encoded = [tokenizer.encode(p) for p in prompts[b * args.batch_size : (b + 1) * args.batch_size]]
        else:
            encoded = self_prompts(Pair(target, None, tokenizer, frozenset(eos)), args.batch_size,
                                   random.Random(args.seed * 1000 + b))
        rows = generate_batch(target, encoded, args.steps, args.temperature, args.batch_size // 2)
        flat = {}
        for i, r in enumerate(rows):
            for k, v in r.items():
                flat[f"{i}_{k}"] = np.asarray(v)
        np.savez(path, **flat)
        n = len(rows) * args.steps
        print(f"batch {b}: {n} positions in {time.perf_counter() - tic:.0f}s "
              f"({n / (time.perf_counter() - tic):.0f}/s), total {time.perf_counter() - t0:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------
# Stage 2: the drafter, its clustered head, and training

DRAFTER_LAYERS = (SLIDING, "full_attention")  # read the target's last sliding / full KV


def drafter_config(target, intermediate: int) -> dict:
    a = target.args
    return {
        "model_type": "gemma4_assistant",
        "architectures": ["Gemma4AssistantForCausalLM"],
        "backbone_hidden_size": target.hidden_size,
        "use_ordered_embeddings": True,
        "num_centroids": 2048,
        "centroid_intermediate_top_k": 32,
        "tie_word_embeddings": True,
        "shares_target_embedding": True,
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": target.hidden_size,
            "num_hidden_layers": len(DRAFTER_LAYERS),
            "layer_types": list(DRAFTER_LAYERS),
            "intermediate_size": intermediate,
            "use_double_wide_mlp": False,
            "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_key_value_heads,
            "head_dim": a.head_dim,
            "global_head_dim": a.head_dim,
            "num_kv_shared_layers": len(DRAFTER_LAYERS),
            "rms_norm_eps": a.rms_norm_eps,
            "sliding_window": a.sliding_window,
            "max_position_embeddings": a.max_position_embeddings,
            "vocab_size": target.vocab_size,
            "vocab_size_per_layer_input": 0,
            "hidden_size_per_layer_input": 0,
            "final_logit_softcapping": None,
            "attention_k_eq_v": False,
            "tie_word_embeddings": True,
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": a.rope_local_base_freq},
                "full_attention": {"rope_type": "default", "rope_theta": a.rope_theta},
            },
        },
    }


def build_drafter(config: dict):
    from mlx_mtp.models.drafter import Drafter, ModelArgs
    from mlx_mtp.checkpoints.loading import normalize_gemma4_text

    config = dict(config, text_config=normalize_gemma4_text(config["text_config"]))
    return Drafter(ModelArgs.from_dict(config))


def balanced_clusters(embedding: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """Equal-size clusters by recursive median splits along each group's principal direction
    (of the L2-normalised rows). Returns token_ordering: cluster c is rows c*V/N .. (c+1)*V/N."""
    rng = np.random.default_rng(seed)
    x = embedding / (np.linalg.norm(embedding, axis=1, keepdims=True) + 1e-6)
    groups = [np.arange(len(x))]
    while len(groups) < num_clusters:
        split = []
        for g in groups:
            xg = x[g] - x[g].mean(0)
            v = rng.standard_normal(x.shape[1]).astype(np.float32)
            for _ in range(8):  # power iteration for the top principal direction
                v = xg.T @ (xg @ v)
                v /= np.linalg.norm(v) + 1e-12
            order = np.argsort(xg @ v, kind="stable")
            half = len(g) // 2
            split += [g[order[:half]], g[order[half:]]]
        groups = split
    return np.concatenate(groups).astype(np.int32)


def init_from_target(drafter, target, intermediate: int):
    """Drafter layers from the target's last sliding / full layer (gemma3 norms are 1 + w;
    gemma3 scales queries by query_pre_attn_scalar**-0.5, the drafter by 1: fold it into q_norm)."""
    weights = []
    scale = target.args.query_pre_attn_scalar ** -0.5
    for d, kind in enumerate(DRAFTER_LAYERS):
        t = target.decoder.layers[target.shared_layer[kind]]
        pre = f"model.layers.{d}."
        weights += [
            (pre + "self_attn.q_proj.weight", t.self_attn.q_proj.weight),
            (pre + "self_attn.o_proj.weight", t.self_attn.o_proj.weight),
            (pre + "self_attn.q_norm.weight", (1 + t.self_attn.q_norm.weight) * scale),
        ]
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            weights.append((pre + norm + ".weight", 1 + getattr(t, norm).weight))
        gate, up, down = t.mlp.gate_proj.weight, t.mlp.up_proj.weight, t.mlp.down_proj.weight
        importance = mx.linalg.norm(gate, axis=1) * mx.linalg.norm(up, axis=1) * mx.linalg.norm(down, axis=0)
        keep = mx.sort(mx.argsort(-importance)[:intermediate])
        weights += [
            (pre + "mlp.gate_proj.weight", gate[keep]),
            (pre + "mlp.up_proj.weight", up[keep]),
            (pre + "mlp.down_proj.weight", down[:, keep]),
        ]
    H = target.hidden_size
    eye = mx.eye(H)
    weights += [
        ("model.norm.weight", 1 + target.decoder.norm.weight),
        ("pre_projection.weight", mx.concatenate([eye, eye], axis=1)),
        ("post_projection.weight", eye),
    ]
    drafter.load_weights(weights, strict=False)


def load_data(path: Path):
    seqs = []
    for f in sorted(path.glob("batch_*.npz")):
        d = np.load(f)
        rows = sorted({int(k.split("_")[0]) for k in d.files})
        for i in rows:
            seqs.append({k: d[f"{i}_{k}"] for k in ("tokens", "prompt_len", "hidden", "greedy", "ks", "kf", "vs", "vf")})
    return seqs


def lookup_matches(tokens: np.ndarray) -> np.ndarray:
    """[n] bool: whether the hybrid's n-gram lookup has a proposal after tokens[: p + 1]
    (the runtime's own index, grown one token at a time as in a generation)."""
    t, index = tokens.tolist(), NGramIndex()
    return np.array([index.lookup(t[: p + 1], 1) is not None for p in range(len(t))], bool)


class Batches:
    """Fixed-shape batches of S whole sequences: every generated position is a round start."""

    def __init__(self, seqs, S: int, K: int):
        self.seqs, self.S, self.K = seqs, S, K
        self.lookup = [lookup_matches(s["tokens"])[int(s["prompt_len"]) :] for s in seqs]  # per round start
        self.L = len(seqs[0]["hidden"])
        self.N = max(len(s["tokens"]) for s in seqs)

    def make(self, idx):
        S, L, K, N = len(idx), self.L, self.K, self.N
        tok = np.zeros((S, L + K - 1), np.int32)
        lab = np.zeros((S, L + K - 1), np.int32)
        match = np.zeros((S, L + K - 1), bool)  # data token at p+1 == target greedy at p
        lookup = np.zeros((S, L), bool)  # the hybrid would take the n-gram lookup's proposal
        carry = np.zeros((S, L, 640), np.float16)
        kv = {k: np.zeros((S, 1, N, 256), np.float16) for k in ("ks", "kf", "vs", "vf")}
        offset = np.zeros((S,), np.int32)
        for r, i in enumerate(idx):
            s = self.seqs[i]
            P, n = int(s["prompt_len"]), len(s["tokens"])
            x, g = s["tokens"][P:], s["greedy"][1:]  # positions P .. n-1
            tok[r, :L] = x
            lab[r, :L] = g
            match[r, : L - 1] = x[1:] == g[:-1]
            lookup[r] = self.lookup[i]
            carry[r] = s["hidden"]
            for k in kv:
                kv[k][r, 0, :n] = s[k]
            offset[r] = P
        valid = np.zeros((K, S, L), bool)
        valid[0] = True
        for k in range(1, K):
            valid[k] = valid[k - 1] & match[:, k - 1 : k - 1 + L]
        kv = {k: mx.array(v).astype(mx.float32) for k, v in kv.items()}
        shared = {SLIDING: (kv["ks"], kv["vs"]), "full_attention": (kv["kf"], kv["vf"])}
        return dict(
            tok=mx.array(tok), lab=mx.array(lab), valid=mx.array(valid), carry=mx.array(carry).astype(mx.float32),
            shared=shared, offset=mx.array(offset), lookup=mx.array(lookup),
        )


def masks_for(offset, L: int, N: int, window: int) -> dict:
    """As Drafter.masks for L consecutive queries per row: keys strictly before the query,
    sliding layers the last W + 1 of them."""
    from mlx_mtp.models.drafter import DRAFTER_SLIDING_EXTRA

    q = offset[:, None, None, None] + mx.arange(L)[None, None, :, None]  # [S, 1, L, 1]
    k = mx.arange(N)[None, None, None, :]
    visible = k < q
    return {SLIDING: visible & (k >= q - (window + DRAFTER_SLIDING_EXTRA)), "full_attention": visible}


def rollout(drafter, target, batch, K: int):
    """K drafter steps for every round start of the batch: constant query position, own carry,
    step k's input token the data's token at p + k (= the accepted draft where it is valid)."""
    L = batch["carry"].shape[1]
    N = batch["shared"][SLIDING][0].shape[2]
    masks = masks_for(batch["offset"], L, N, drafter.text_args.sliding_window)
    carry, hs = batch["carry"], []
    for k in range(K):
        emb = mx.stop_gradient(target.embed(batch["tok"][:, k : k + L]))
        x = drafter.pre_projection(mx.concatenate([emb, carry], axis=-1))
        for layer, kind in zip(drafter.model.layers, drafter.layer_types):
            x, _, _ = layer(x, masks[kind], None, shared_kv=batch["shared"][kind], offset=batch["offset"])
        h = drafter.model.norm(x)
        hs.append(h)
        carry = drafter.post_projection(h)
    return hs


def make_loss(target, cluster_of, frequent, K, weights, negatives, lookup_weight):
    """Step k's loss weighs round starts where the hybrid takes the lookup's proposal by
    `lookup_weight`: there the drafter's drafts are only used by the drafter alone."""
    E = target.decoder.embed_tokens.weight
    E_freq = E[frequent]  # [F, H]

    def loss_fn(drafter, batch):
        hs = rollout(drafter, target, batch, K)
        start_weight = mx.where(batch["lookup"], lookup_weight, 1.0).reshape(-1)  # [M]
        total, stats = 0.0, []
        for k in range(K):
            L = hs[k].shape[1]
            h = hs[k].reshape(-1, hs[k].shape[-1])  # [M, H]
            y = batch["lab"][:, k : k + L].reshape(-1)
            valid = batch["valid"][k].reshape(-1) * start_weight
            pos = (h * E[y]).sum(-1)  # [M]
            neg_f = h @ E_freq.T  # [M, F]
            neg_f = mx.where(frequent[None] == y[:, None], -1e9, neg_f)
            ny = y[:negatives]  # in-batch labels as more negatives
            neg_b = mx.where(ny[None] == y[:, None], -1e9, h @ E[ny].T)
            lse = mx.logsumexp(mx.concatenate([pos[:, None], neg_f, neg_b], axis=1), axis=1)
            ce = ((lse - pos) * valid).sum() / mx.maximum(valid.sum(), 1)
            cl = drafter.masked_embedding.centroids(mx.stop_gradient(h))  # [M, C]
            c = cluster_of[y]
            cce = ((mx.logsumexp(cl, axis=1) - mx.take_along_axis(cl, c[:, None], axis=1)[:, 0]) * valid).sum() / mx.maximum(valid.sum(), 1)
            total = total + weights[k] * (ce + cce)
            stats += [ce, cce]
        return total, mx.stack(stats)

    return loss_fn


def head_metrics(drafter, target, batch, K, cluster_of, rows=3072, chunk=256):
    """Teacher-forced, on `rows` round starts spread over all the batch's sequences: share of
    round starts whose step-k draft (the clustered head's argmax) is the target's greedy
    token, the same where the hybrid would not take the lookup, and share whose greedy token
    is in the candidate set.
    The head's argmax is taken as the argmax of the full logits masked to its top clusters:
    the same tokens, without gathering 4096 embedding rows per row (checked on 1024 rows of
    the shipped drafter: equal figures, 18 s instead of 41 s here)."""
    E = target.decoder.embed_tokens.weight
    head = drafter.masked_embedding
    hs = rollout(drafter, target, batch, K)
    every = slice(None, None, max(1, batch["lookup"].size // rows))
    plain = ~np.array(batch["lookup"].reshape(-1)[every])
    out = []
    for k in range(K):
        L = hs[k].shape[1]
        h = hs[k].reshape(-1, hs[k].shape[-1])[every]  # [M, H]
        y = batch["lab"][:, k : k + L].reshape(-1)[every]
        valid = np.array(batch["valid"][k].reshape(-1)[every])
        hits, covered = [], []
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], y[s : s + chunk]
            centroid_logits = head.centroids(hc)  # [c, N]
            kth = mx.sort(centroid_logits, axis=1)[:, -head.top_k][:, None]
            chosen = centroid_logits >= kth  # [c, N]: the top-k clusters (ties aside)
            candidate = mx.take(chosen, cluster_of, axis=1)  # [c, V]
            best = mx.argmax(mx.where(candidate, hc @ E.T, -mx.inf), axis=1)
            hits.append(best == yc)
            covered.append(mx.take_along_axis(candidate, yc[:, None], axis=1)[:, 0])
            mx.eval(hits[-1], covered[-1])
        hits, covered = np.array(mx.concatenate(hits)), np.array(mx.concatenate(covered))
        out.append((hits[valid].mean(), hits[valid & plain].mean(), covered[valid].mean(), int(valid.sum())))
    return out


def save_drafter(drafter, config: dict, out: Path, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for k, v in tree_flatten(drafter.parameters()):
        weights[k] = v if v.dtype == mx.int32 else v.astype(mx.bfloat16)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "NOTICE").write_text(
        GEMMA_NOTICE
        + "\nThis drafter is a Model Derivative of Gemma 3 270M: it was trained by mlx-mtp "
        "(scripts/train_drafter.py) on the outputs of Gemma 3 270M, its layers initialised from "
        "Gemma 3 270M's last sliding and full layers, and it uses Gemma 3 270M's token embedding at "
        "run time. Use of this drafter is subject to the Gemma Terms of Use "
        "(ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy "
        "(ai.google.dev/gemma/prohibited_use_policy).\n"
    )
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def stage_train(args):
    mx.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    target, _, _, _ = load_models(str(ensure_target()), None)
    target.model.freeze()
    seqs = [s for d in args.data for s in load_data(Path(d))]
    rng.shuffle(seqs)
    val, train = seqs[: args.val_seqs], seqs[args.val_seqs :]
    positions = sum(len(s["hidden"]) for s in train)
    print(f"data: {len(train)} train sequences ({positions} round starts), {len(val)} validation", flush=True)

    config = drafter_config(target, args.intermediate)
    drafter = build_drafter(config)
    lend = lambda: drafter.lend_embedding(target.decoder.embed_tokens)  # noqa: E731
    lend()

    tic = time.perf_counter()
    V = target.vocab_size
    if args.init:  # warm start: the drafter's weights, its clusters included, from an earlier run
        init = mx.load(str(Path(args.init) / "model.safetensors"))
        drafter.load_weights([(k, v if v.dtype == mx.int32 else v.astype(mx.float32)) for k, v in init.items()])
        ordering = np.array(drafter.masked_embedding.token_ordering)
    else:
        init_from_target(drafter, target, args.intermediate)
        E = np.array(target.decoder.embed_tokens.weight)
        cached = Path(args.data[0]) / f"clusters-seed{args.seed}.npy"  # deterministic: reuse across runs
        if cached.exists():
            ordering = np.load(cached)
        else:
            ordering = balanced_clusters(E, 2048, args.seed)
            np.save(cached, ordering)
        drafter.masked_embedding.token_ordering = mx.array(ordering)
        drafter.masked_embedding.centroids.weight = mx.array(E[ordering.reshape(2048, -1)].mean(1) * 4.0)
        del E
    assert sorted(ordering.tolist()) == list(range(V))
    clusters = ordering.reshape(2048, -1)
    cluster_of = np.zeros(V, np.int32)
    cluster_of[ordering] = np.arange(V) // clusters.shape[1]
    cluster_of = mx.array(cluster_of)
    t_cluster = time.perf_counter() - tic
    print(f"clusters: {t_cluster:.0f}s", flush=True)

    counts = np.bincount(np.concatenate([s["greedy"] for s in train]), minlength=target.vocab_size)
    frequent = mx.array(np.argsort(-counts)[: args.frequent].astype(np.int32))
    print(f"top-{args.frequent} greedy tokens cover {np.sort(counts)[::-1][: args.frequent].sum() / counts.sum():.3f} of labels")

    drafter.masked_embedding.freeze(keys=["token_ordering"])
    for layer in drafter.model.layers:
        layer.freeze(keys=["layer_scalar"], recurse=False)
    K = args.rollout
    weights = [1.0, 0.5, 0.25, 0.125][:K]
    loss_fn = make_loss(target, cluster_of, frequent, K, weights, args.negatives, args.lookup_weight)
    batches = Batches(train, args.seqs_per_batch, K)
    val_batch = Batches(val, len(val), K).make(list(range(len(val))))
    budget = args.minutes * 60
    schedule = lambda frac: args.lr * min(1.0, frac * 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))  # noqa: E731
    opt = optim.AdamW(learning_rate=args.lr, weight_decay=0.0)
    value_and_grad = nn.value_and_grad(drafter, loss_fn)

    def report(step, seen):
        drafter.eval()
        m = head_metrics(drafter, target, val_batch, K, cluster_of)
        text = " ".join(f"step{k + 1} acc {a:.3f} no-lookup {b:.3f} cover {c:.3f} (n={n})" for k, (a, b, c, n) in enumerate(m))
        print(f"[{time.perf_counter() - t_train:.0f}s] step {step} seen {seen}: val {text}", flush=True)
        return m

    best = {"score": -1.0}

    def keep_best(metrics, step):
        """Keep the weights of the best validation first-draft acceptance, where the lookup
        has no proposal if those are weighted up (more steps on a fixed data set overfit)."""
        score = metrics[0][1] if args.lookup_weight < 1 else metrics[0][0]
        if score > best["score"]:
            best.update(score=score, step=step, metrics=metrics,
                        weights=dict(tree_flatten(drafter.parameters())))  # updates replace, never mutate, arrays
            save_drafter(drafter, config, Path(args.out), {"partial": True, "step": step})

    t_train = time.perf_counter()
    report(0, 0)
    step, seen, curve = 0, 0, []
    order = []
    while time.perf_counter() - t_train < budget:
        if len(order) < args.seqs_per_batch:
            order += rng.permutation(len(train)).tolist()
        idx, order = order[: args.seqs_per_batch], order[args.seqs_per_batch :]
        batch = batches.make(idx)
        opt.learning_rate = schedule((time.perf_counter() - t_train) / budget)
        (loss, parts), grads = value_and_grad(drafter, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(drafter, grads)
        mx.eval(drafter.parameters(), opt.state, loss, parts)
        step += 1
        seen += len(idx) * batches.L
        if step % 10 == 0:
            p = parts.tolist()
            curve.append({"step": step, "seconds": round(time.perf_counter() - t_train), "loss": round(loss.item(), 4),
                          "ce": [round(x, 3) for x in p[0::2]], "centroid_ce": [round(x, 3) for x in p[1::2]]})
            print(f"[{time.perf_counter() - t_train:.0f}s] step {step} loss {loss.item():.3f} ce {p[0::2]} cent {p[1::2]} "
                  f"lr {opt.learning_rate.item():.2e}", flush=True)
        if step % args.report_every == 0:
            keep_best(report(step, seen), step)
    keep_best(report(step, seen), step)
    t_train = time.perf_counter() - t_train
    drafter.load_weights(list(best["weights"].items()))
    meta = {
        "command": " ".join(sys.argv),
        "seed": args.seed,
        "init": args.init,
        "train_sequences": len(train),
        "train_round_starts": positions,
        "validation_sequences": len(val),
        "steps": step,
        "best_step": best["step"],
        "round_starts_seen": seen,
        "train_seconds": round(t_train),
        "cluster_seconds": round(t_cluster),
        "lookup_weight": args.lookup_weight,
        "validation_teacher_forced": [{"acceptance": float(a), "acceptance_no_lookup": float(b), "coverage": float(c), "n": n}
                                      for a, b, c, n in best["metrics"]],
        "curve": curve,
    }
    save_drafter(drafter, config, Path(args.out), meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "curve"}, indent=1))



# ---------------------------------------------------------------------------------------
# Stage 3: held-out acceptance and greedy equality


def plain_greedy(pair, ids, max_tokens):
    """mlx-lm's own greedy decoding of the target alone."""
    from mlx_lm.generate import stream_generate

    out = []
    for r in stream_generate(pair.target.model, pair.tokenizer, mx.array(ids), max_tokens=max_tokens):
        out.append(r.token)
        if r.token in pair.eos_ids:
            break
    return out


def first_drafts_everywhere(pair, proposers: dict, prompt, truth) -> dict:
    """Every position of the greedy output `truth` as a round start (the target advancing one
    token at a time): does each proposer's first draft equal the target's token there?"""
    from mlx_mtp.decoding.proposers import DraftContext
    from mlx_mtp.decoding.sampling import SamplingParams
    from mlx_mtp.engine.scheduler import Engine
    from mlx_mtp.request import GenerationRequest

    params = SamplingParams()
    states = {name: proposer.new_state() for name, proposer in proposers.items()}  # as every generation starts
    engine = Engine(pair, max_batch=1)
    row = engine.add(GenerationRequest(prompt, params, max_tokens=len(truth), draft_tokens=0))
    engine.step()  # reads the prompt and commits truth[0]
    hits = {name: [] for name in proposers}
    for t in range(1, len(truth)):  # row.tokens[-1] is truth[t - 1]; the first draft guesses truth[t]
        kv = pair.target.shared_kv(engine.cache)
        ctx = DraftContext(mx.array(row.tokens[-1:]), row.carry, row.position, kv, [row.tokens], [params])
        for name, proposer in proposers.items():
            ctx.states = [states[name]]
            proposal = proposer.propose(ctx, 1)
            hit = proposal is not None and proposal.tokens[0, 0].item() == truth[t]
            if proposal is not None:  # the hybrid's live per-source acceptance
                proposer.observe(ctx.states, proposal.sources or [proposer.name], [int(hit)], [truth[t:]])
            hits[name].append(hit)
        engine.step()  # one plain round: commits truth[t]
    engine.remove(row)
    return hits


def stage_eval(args):
    from mlx_mtp import generate
    from mlx_mtp.decoding.proposers import HybridProposer, MTPProposer
    from mlx_mtp.engine.stats import Stats
    from mlx_mtp.request import encode

    tic = time.perf_counter()
    pair = mlx_mtp.load(str(ensure_target()), args.drafter)
    if args.prompts == "bench":  # mlx-mtp bench's built-in prompts, as bench sends them
        prompts = [encode_prompt(pair, p, True) for kind in load_prompts().values() for p in kind]
    else:
        prompts = [encode(pair.tokenizer, p) for p in EVAL_PROMPTS]
    drafter = MTPProposer(pair.drafter, pair.target)
    proposers = {"drafter": drafter, "hybrid": HybridProposer(drafter)}
    results = {name: {} for name in proposers}
    identical, outputs = True, []
    for name, proposer in proposers.items():  # live decoding at a fixed K
        total = Stats()
        for prompt in prompts:
            r = generate(pair, prompt, max_tokens=args.max_tokens, num_draft_tokens=args.draft_tokens,
                         proposer=proposer)
            total = Stats.pooled([total, r.stats])
            if name == "drafter":
                outputs.append(r.tokens)
                if args.check_plain and plain_greedy(pair, prompt, args.max_tokens) != r.tokens:
                    identical = False
                    print(f"MISMATCH on {prompt!r}")
        results[name]["live_rounds"] = {
            "per_position_acceptance": [round(x, 3) for x in total.per_position_acceptance],
            "acceptance_rate": round(total.acceptance_rate, 3),
            "mean_accepted_length": round(total.mean_accepted_length, 3),
            "by_source": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in total.by_source.items()},
            "rounds": total.rounds,
        }
    hits = {name: [] for name in proposers}
    for prompt, truth in zip(prompts, outputs):
        for name, h in first_drafts_everywhere(pair, proposers, prompt, truth).items():
            hits[name] += h
    for name in proposers:
        results[name]["first_draft_every_position"] = round(sum(hits[name]) / len(hits[name]), 3)
    results["positions"] = len(hits["drafter"])
    if args.check_plain:
        results["identical_to_plain_mlx_lm"] = identical
    results["prompts"] = f"{len(prompts)} ({args.prompts})"
    results["max_tokens"] = args.max_tokens
    results["draft_tokens"] = args.draft_tokens
    results["seconds"] = round(time.perf_counter() - tic)
    print(json.dumps(results, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default="/tmp/drafter-data")
    d.add_argument("--prompts", choices=["templates", "self"], default="templates",
                   help="templated seed prompts, or text the target samples itself (plain and as a chat turn)")
    d.add_argument("--batches", type=int, default=20, help="batches the seed prompts are drawn for")
    d.add_argument("--max-batches", type=int, default=0, help="stop after this many (0: all)")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--steps", type=int, default=192)
    d.add_argument("--temperature", type=float, default=0.8)
    d.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("--data", nargs="+", default=["/tmp/drafter-data"], help="one or more `data` directories")
    t.add_argument("--out", default="mlx_mtp/checkpoints/assets/gemma-3-270m-drafter")
    t.add_argument("--init", help="a drafter directory to start from (default: the target's layers)")
    t.add_argument("--minutes", type=float, default=30)
    t.add_argument("--intermediate", type=int, default=1536)
    t.add_argument("--rollout", type=int, default=2)
    t.add_argument("--seqs-per-batch", type=int, default=6)
    t.add_argument("--val-seqs", type=int, default=32)
    t.add_argument("--frequent", type=int, default=6144)
    t.add_argument("--negatives", type=int, default=1024)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--lookup-weight", type=float, default=1.0,
                   help="loss weight of round starts where the hybrid takes the n-gram lookup")
    t.add_argument("--report-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("--drafter", default="mlx_mtp/checkpoints/assets/gemma-3-270m-drafter")
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--draft-tokens", type=int, default=2)
    e.add_argument("--prompts", choices=["held-out", "bench"], default="held-out",
                   help="EVAL_PROMPTS as plain text, or mlx-mtp bench's built-in prompts as a chat turn")
    e.add_argument("--no-check-plain", dest="check_plain", action="store_false")
    e.add_argument("--json-out")
    args = p.parse_args()
    {"data": stage_data, "train": stage_train, "eval": stage_eval}[args.stage](args)
