"""Resolve, load and check a target + drafter pair.

Configs are accepted as published: transformers 5.20 writes `per_layer_config` (and omits
keys equal to its own defaults), while mlx-lm's `gemma4_text` wants a top-level
`global_head_dim` and has different defaults. `normalize_gemma4_text` bridges the two.
Every failure is a `LoadError` with a one-line message.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.utils import load_config, load_model, load_tokenizer

from ..images import Vision
from ..models.drafter import Drafter, ModelArgs as DrafterArgs
from ..models.pipeline import Pipeline, weight_bytes
from ..models.target import FULL, SLIDING, Target

TARGET_TYPES = ("gemma4", "gemma4_text", "gemma3_text")

# transformers 5.20.2 Gemma4TextConfig defaults where mlx-lm's ModelArgs defaults differ.
HF_GEMMA4_TEXT_DEFAULTS = {
    "hidden_size": 2304,
    "num_hidden_layers": 30,
    "intermediate_size": 9216,
    "num_key_value_heads": 4,
    "num_kv_shared_layers": 0,
    "final_logit_softcapping": None,
    "use_double_wide_mlp": False,
    "global_head_dim": 512,
}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class LoadError(ValueError):
    """A pair that cannot be loaded or does not fit; the message is one line."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def normalize_gemma4_text(config: dict) -> dict:
    """A gemma4_text config as mlx-lm reads it, with transformers' meaning."""
    out = {**HF_GEMMA4_TEXT_DEFAULTS, **config}
    if out.get("layer_types") is None:  # transformers: 5 sliding : 1 full, last is full
        n = out["num_hidden_layers"]
        out["layer_types"] = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
        out["layer_types"][-1] = FULL
    per_layer = out.pop("per_layer_config", None) or {}
    full = [per_layer[k] for k in per_layer if out["layer_types"][int(k)] == FULL]
    for key, top in (("head_dim", "global_head_dim"), ("num_key_value_heads", "num_global_key_value_heads")):
        values = {layer[key] for layer in full if key in layer}
        if len(values) > 1:
            raise LoadError(f"full-attention layers with different {key} ({sorted(values)}) are not supported")
        if values:
            out[top] = values.pop()
    return out


def resolve(path_or_repo: str) -> Path:
    """A local directory, or a Hugging Face repo id downloaded (or found) in the HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if path_or_repo.count("/") != 1 or path_or_repo.startswith((".", "/", "~")):
        raise LoadError(f"{path_or_repo}: no such directory and not a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=WEIGHT_PATTERNS))
    except LocalEntryNotFoundError:
        raise LoadError(
            f"{path_or_repo} is not in the local Hugging Face cache and the hub is offline: "
            f"fetch it with `hf download {path_or_repo}` on a connected machine"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise LoadError(f"cannot download {path_or_repo}: {_one_line(e)}") from None


def read_config(path: Path) -> dict:
    """config.json, with generation_config.json's EOS ids when it has them (mlx-lm's rule)."""
    try:
        return load_config(path)
    except FileNotFoundError:
        raise LoadError(f"{path}: no config.json") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}/config.json is not valid JSON ({e})") from None


def _load_weights_into(path: Path, config: dict, classes=None, lazy: bool = False):
    kwargs = {"get_model_classes": classes} if classes else {}
    try:
        return load_model(path, lazy=lazy, model_config=config, **kwargs)[0]
    except FileNotFoundError:
        raise LoadError(f"{path}: no model*.safetensors weights") from None
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise LoadError(f"{path}: cannot load weights ({_one_line(e)})") from None


def _eos_ids(config: dict) -> set:
    """Stop ids as mlx-lm takes them (`read_config` merged generation_config.json's; the
    tokenizer's own EOS is added by the tokenizer wrapper)."""
    eos = config.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def load_target(path: Path, pipeline: Optional[Pipeline] = None, drafter: bool = False):
    """(Target, tokenizer or None, eos ids) from an mlx-lm Gemma checkpoint directory. In a
    pipeline, only this rank's weights are read (see `Target`)."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in TARGET_TYPES:
        raise LoadError(f"{path}: unsupported target model_type {model_type!r} (supported: {', '.join(TARGET_TYPES)})")
    overrides = {}
    if model_type == "gemma4":
        text = normalize_gemma4_text(config.get("text_config") or {})
        overrides = {"text_config": text, "vocab_size": text.get("vocab_size", 262144)}
    elif model_type == "gemma4_text":
        overrides = normalize_gemma4_text(config)
    model = _load_weights_into(path, overrides, lazy=pipeline is not None)
    target = Target(model, pipeline, drafter)
    target.vision = Vision.of(path, config) if model_type == "gemma4" else None
    if pipeline is not None:
        try:  # the weights of the layers kept: read now, not in the first forward
            mx.eval(model.parameters())
        except (ValueError, RuntimeError) as e:
            raise LoadError(f"{path}: cannot load weights ({_one_line(e)})") from None
        target.weight_bytes = weight_bytes(model)
    eos = _eos_ids(config)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer = load_tokenizer(path, eos_token_ids=sorted(eos) or None)
        eos |= set(tokenizer.eos_token_ids)
    return target, tokenizer, eos


def load_drafter(path: Path, dtype=None) -> Drafter:
    config = read_config(path)
    if config.get("model_type") != "gemma4_assistant":
        raise LoadError(f"{path}: not a Gemma 4 assistant drafter (model_type {config.get('model_type')!r})")
    text = normalize_gemma4_text(config.get("text_config") or {})
    drafter = _load_weights_into(path, {"text_config": text}, lambda config: (Drafter, DrafterArgs))
    if dtype is not None:  # compute in the target's dtype: its KV arrays are read as they are
        drafter.set_dtype(dtype, lambda t: mx.issubdtype(t, mx.floating))
    return drafter


def lend_target_embedding(target: Target, drafter: Drafter):
    if drafter.args.shares_target_embedding:
        drafter.lend_embedding(target.decoder.embed_tokens)


def check_pair(target: Target, drafter: Drafter):
    """One-line errors for a drafter that cannot run on this target."""
    backbone = drafter.args.backbone_hidden_size
    if backbone != target.hidden_size:
        raise LoadError(
            f"drafter backbone_hidden_size {backbone} does not match target hidden_size {target.hidden_size}"
        )
    if drafter.vocab_size != target.vocab_size:
        raise LoadError(f"drafter vocab_size {drafter.vocab_size} does not match target vocab_size {target.vocab_size}")
    for kind in set(drafter.layer_types):
        if kind not in target.shared_layer:
            raise LoadError(f"target has no non-shared {kind} layer for the drafter to read")
        own = target.decoder.layers[target.shared_layer[kind]].self_attn
        mine = next(layer.self_attn for layer in drafter.model.layers if layer.layer_type == kind)
        if mine.head_dim != own.head_dim:
            raise LoadError(f"drafter {kind} head_dim {mine.head_dim} does not match target head_dim {own.head_dim}")


def load_models(target_path: str, drafter_path: Optional[str], pipeline: Optional[Pipeline] = None):
    """(target, drafter, tokenizer, eos ids). In a pipeline, the drafter is loaded on rank 0
    only, next to the layers whose KV it reads."""
    target, tokenizer, eos = load_target(resolve(target_path), pipeline, drafter_path is not None)
    drafter = None
    if drafter_path is not None and (pipeline is None or pipeline.last):
        drafter = load_drafter(resolve(drafter_path), target.dtype)
        lend_target_embedding(target, drafter)
        check_pair(target, drafter)
    return target, drafter, tokenizer, eos
