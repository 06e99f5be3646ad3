"""A tokenizer rebuilt from the SentencePiece vocabulary a GGUF carries in its metadata.

llama.cpp's "llama" tokenizer is SentencePiece BPE: pieces with scores (the adjacent pair
whose concatenation scores highest merges first) and types (normal, control, user-defined,
byte). From them `write_tokenizer` writes two equivalent files:
- tokenizer.model, the SentencePiece model itself: the reference;
- tokenizer.json, the same tokenizer for the `tokenizers` library: what mlx-lm loads (in
  seconds, where converting tokenizer.model takes it ~10 s each time) and streams with its
  SPM detokenizer.
Both agree id for id (tests/test_embedded.py), including runs of more than 31 spaces, where
a tokenizer.json with the whitespace pieces as ordinary merges would not.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from gguf.constants import TokenType
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from .loading import LoadError

SPACE = "\u2581"  # how SentencePiece writes a space inside pieces

# Gemma's turn format, for GGUFs that carry no chat template (Gemma has no system role:
# a system message opens the first user turn).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass
class Vocab:
    pieces: List[str]  # as the GGUF stores them
    scores: List[float]
    types: List[int]  # gguf TokenType values (the same numbers as SentencePiece's)
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: Optional[int]
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]

    @classmethod
    def from_gguf(cls, meta: dict) -> "Vocab":
        model = meta.get("tokenizer.ggml.model")
        if model != "llama":
            raise LoadError(f"GGUF tokenizer {model!r} is not a SentencePiece ('llama') tokenizer")
        if meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default
            raise LoadError("GGUF tokenizers that add a space prefix are not supported")
        pieces = list(meta["tokenizer.ggml.tokens"])
        if len(set(pieces)) != len(pieces):
            raise LoadError("GGUF tokenizer has duplicate pieces")
        return cls(
            pieces=pieces,
            scores=[float(s) for s in meta["tokenizer.ggml.scores"]],
            types=[int(t) for t in meta["tokenizer.ggml.token_type"]],
            bos_id=int(meta["tokenizer.ggml.bos_token_id"]),
            eos_id=int(meta["tokenizer.ggml.eos_token_id"]),
            unk_id=int(meta["tokenizer.ggml.unknown_token_id"]),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @property
    def eos_ids(self) -> List[int]:
        """The end-of-sequence id, and Gemma's end of turn, which ends a chat reply."""
        end_of_turn = [i for i, p in enumerate(self.pieces) if p == "<end_of_turn>"]
        return sorted({self.eos_id, *end_of_turn})

    def of_type(self, kind: TokenType) -> List[int]:
        return [i for i, t in enumerate(self.types) if t == kind]


def sentencepiece_model(vocab: Vocab) -> bytes:
    """The serialized SentencePiece BPE model (identity normalization, as Gemma's)."""
    model = sp_pb2.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(vocab.pieces, vocab.scores, vocab.types)):
        if kind == TokenType.USER_DEFINED:
            # llama.cpp writes user-defined spaces as " "; SentencePiece matches these
            # pieces after escaping spaces, so they must hold its escaped form.
            piece = piece.replace(" ", SPACE)
        if i == vocab.unk_id:
            # llama.cpp types <unk> CONTROL (from the HF special-token list); SentencePiece
            # requires exactly one UNKNOWN piece.
            kind = TokenType.UNKNOWN
        model.pieces.add(piece=piece, score=score, type=int(kind))
    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(vocab.pieces)
    spec.byte_fallback = bool(vocab.of_type(TokenType.BYTE))
    spec.unk_id, spec.bos_id, spec.eos_id = vocab.unk_id, vocab.bos_id, vocab.eos_id
    spec.pad_id = -1 if vocab.pad_id is None else vocab.pad_id
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def bpe_merges(vocab: Vocab) -> List[tuple]:
    """SentencePiece's score order as ranked merges: every split of a normal piece into
    two normal pieces, best-scoring piece first. (Control and user-defined pieces never
    take part in merges: SentencePiece matches user-defined ones whole, beforehand.)"""
    normal = {vocab.pieces[i] for i in vocab.of_type(TokenType.NORMAL)}
    ranked = sorted(vocab.of_type(TokenType.NORMAL), key=lambda i: -vocab.scores[i])
    return [
        (piece[:k], piece[k:])
        for piece in (vocab.pieces[i] for i in ranked)
        for k in range(1, len(piece))
        if piece[:k] in normal and piece[k:] in normal
    ]


def tokenizers_json(vocab: Vocab) -> Tokenizer:
    """The same tokenizer for the `tokenizers` library."""
    pieces = vocab.pieces
    model = BPE(
        vocab={p: i for i, p in enumerate(pieces)},
        merges=bpe_merges(vocab),
        unk_token=pieces[vocab.unk_id],
        byte_fallback=bool(vocab.of_type(TokenType.BYTE)),
        fuse_unk=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    # The decoder mlx-lm recognises as SentencePiece's: it then streams with its linear
    # SPM detokenizer.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    control = set(vocab.of_type(TokenType.CONTROL)) | {vocab.unk_id}
    tokenizer.add_special_tokens(
        [AddedToken(pieces[i], special=True, normalized=False) for i in sorted(control)]
    )
    # User-defined pieces are matched whole in the raw text, longest first, before BPE:
    # SentencePiece's rule. They keep llama.cpp's raw spaces, so "  " matches two spaces.
    user = vocab.of_type(TokenType.USER_DEFINED)
    tokenizer.add_tokens([AddedToken(pieces[i], special=False, normalized=False) for i in user])
    bos, eos = pieces[vocab.bos_id], pieces[vocab.eos_id]
    single = ([f"{bos}:0"] if vocab.add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if vocab.add_eos else [])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), special_tokens=[(bos, vocab.bos_id), (eos, vocab.eos_id)]
    )
    return tokenizer


def write_tokenizer(vocab: Vocab, out: Path, max_length: int):
    """tokenizer.model, tokenizer.json and the configs `mlx_lm.utils.load_tokenizer` reads."""
    (out / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
    tokenizers_json(vocab).save(str(out / "tokenizer.json"))
    special = {
        "bos_token": vocab.pieces[vocab.bos_id],
        "eos_token": vocab.pieces[vocab.eos_id],
        "unk_token": vocab.pieces[vocab.unk_id],
    }
    if vocab.pad_id is not None:
        special["pad_token"] = vocab.pieces[vocab.pad_id]
    config = {
        # The generic fast tokenizer reads tokenizer.json as written; GemmaTokenizer would
        # rebuild its pre-tokenizer and added tokens.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",
        "chat_template": vocab.chat_template or GEMMA_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
