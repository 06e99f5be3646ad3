"""A tiny Gemma 3 GGUF written with the `gguf` package, shaped like llama.cpp's conversion:
Q8_0 and F32 tensors, norms stored as 1 + w, and a small SentencePiece BPE vocabulary
(control, user-defined, byte and normal pieces, as in the real one). Six layers: mlx-lm's
gemma3_text needs one whole sliding pattern (5 sliding, 1 full)."""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, WINDOW = 64, 6, 2, 1, 32, 128, 16

CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
# llama.cpp writes user-defined spaces raw (" "), not as SentencePiece's "▁".
USER_DEFINED = ["\n", "\n\n", "  ", "   ", "    ", "\t", "<b>", "</b>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# Merged pieces best first (SentencePiece BPE scores them -rank), then single characters.
MERGED = [
    "▁t", "he", "▁the", "in", "▁a", "er", "▁w", "or", "ld", "▁wor", "▁world", "ing", "▁in",
    "an", "▁an", "▁and", "lo", "▁he", "llo", "▁hello", "es", "ab", "bc", "abc", "▁T", "▁The",
]
CHARS = list("▁abcdefghijklmnopqrstuvwxyzT.,!?é")
PIECES = CONTROL + USER_DEFINED + BYTES + MERGED + CHARS
TYPES = (
    [TokenType.CONTROL] * len(CONTROL)
    + [TokenType.USER_DEFINED] * len(USER_DEFINED)
    + [TokenType.BYTE] * len(BYTES)
    + [TokenType.NORMAL] * (len(MERGED) + len(CHARS))
)
SCORES = (
    [-1000.0] * (len(CONTROL) + len(USER_DEFINED))
    + [0.0] * len(BYTES)
    + [-float(i) for i in range(len(MERGED) + len(CHARS))]
)
VOCAB = len(PIECES)

BLOCK_SHAPES = {  # gguf name -> numpy shape [out, in] (1-D for norms)
    "attn_norm": (HIDDEN,),
    "attn_q": (HEADS * HEAD_DIM, HIDDEN),
    "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_output": (HIDDEN, HEADS * HEAD_DIM),
    "attn_q_norm": (HEAD_DIM,),
    "attn_k_norm": (HEAD_DIM,),
    "post_attention_norm": (HIDDEN,),
    "ffn_norm": (HIDDEN,),
    "post_ffw_norm": (HIDDEN,),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}
Q8_0 = {"token_embd", "attn_q", "attn_v", "ffn_gate", "ffn_down"}


def tensors(seed: int = 0) -> dict:
    """gguf name -> (float32 values as stored, quantization type)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.{part}.weight": shape for part, shape in BLOCK_SHAPES.items()})
    out = {}
    for name, shape in shapes.items():
        part = name.split(".")[-2]
        if name.endswith("norm.weight"):
            values = 1.0 + rng.normal(0, 0.1, shape)  # llama.cpp's 1 + w
        else:
            values = rng.normal(0, 0.5 if part == "token_embd" else 0.1, shape)
        kind = GGMLQuantizationType.Q8_0 if part in Q8_0 else GGMLQuantizationType.F32
        out[name] = (values.astype(np.float32), kind)
    return out


def write(path: Path, seed: int = 0, arch: str = "gemma3") -> dict:
    """Write the GGUF; returns gguf name -> the float32 values a reader dequantizes."""
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(WINDOW)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(PIECES)
    writer.add_token_scores(SCORES)
    writer.add_token_types([int(t) for t in TYPES])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    stored = {}
    for name, (values, kind) in tensors(seed).items():
        if kind == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
            stored[name] = values
        else:
            data = quantize(values, kind)
            writer.add_tensor(name, data, raw_dtype=kind)
            stored[name] = dequantize(data, kind).reshape(values.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored
