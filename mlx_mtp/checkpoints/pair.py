"""A loaded pair: the target, its drafter and the tokenizer, as plain data."""

from dataclasses import dataclass
from typing import Optional

from ..models import pipeline
from .loading import load_models
from .registry import DIALOGUE, TEMPLATE, find_pair


@dataclass(frozen=True, eq=False)
class Pair:
    """What loading gives; nothing here changes while it is used. Who drafts and what
    rounds cost belong to the engine that decodes with it."""

    target: object  # Target
    drafter: Optional[object]  # Drafter, or None for plain decoding
    tokenizer: Optional[object]  # mlx-lm TokenizerWrapper, or None (token-id prompts only)
    eos_ids: frozenset
    name: str = ""
    default_draft_tokens: int = 4
    chat: str = TEMPLATE  # how to chat with the target: TEMPLATE, or DIALOGUE (a base model)
    label: str = ""  # what the model is, for chat's banner
    drafter_on_rank_0: bool = False  # a pipeline rank without the drafter, which rank 0 has
    distributed: Optional[dict] = None  # in a pipeline: world size, each rank's layers and weight bytes


def load_pair(target: str, drafter: Optional[str] = None) -> Pair:
    """A pair from paths or Hugging Face repo ids, or a models.toml alias (then with its
    name, default K and chat mode). Under `mlx.launch`: this rank's share of a
    pipeline-sharded target."""
    name, default_k, chat, label = "", 4, "", ""
    if drafter is None:
        entry = find_pair(target)
        if entry is not None:
            target, drafter = entry.target_path(), entry.drafter_path()
            name, default_k, chat, label = entry.alias, entry.draft_tokens, entry.chat, entry.label
    group = pipeline.init()
    target_, drafter_, tokenizer, eos = load_models(target, drafter, group)
    if not chat:  # a checkpoint without a chat template is taken for a base model
        chat = TEMPLATE if tokenizer is not None and tokenizer.has_chat_template else DIALOGUE
    elsewhere = drafter is not None and drafter_ is None
    layout = pipeline.describe(group, target_.weight_bytes) if group is not None else None
    return Pair(target_, drafter_, tokenizer, frozenset(eos), name, default_k, chat, label, elsewhere, layout)
