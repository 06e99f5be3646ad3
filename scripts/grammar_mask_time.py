"""What a grammar engine costs per token on the embedded Gemma tokenizer (262,144 ids): the
numbers behind mlx-mtp's choice of llguidance for `response_format` (docs/serving.md).

    python scripts/grammar_mask_time.py [--engines llguidance,xgrammar,outlines-core] [--repeats 5]

For one JSON schema and a reply that follows it (about 30 tokens), each installed engine:
compiles the schema (ms), then per token computes the mask of allowed ids and consumes the
token (median and max ms of the mask over the reply, the fastest of `--repeats` passes),
and rolls back the whole reply (checked: the first mask again equals the first mask). An
engine that is not installed is named, not measured.
"""

import argparse
import json
import statistics
import time

import mlx_mtp  # noqa: F401  (before mlx: loads MKL on Linux)
import numpy as np

from mlx_mtp.checkpoints.embedded import ensure_target

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "email": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "email", "age", "tags"],
    "additionalProperties": False,
}
REPLY = '{"name": "Maria Lopez", "email": "maria.lopez@example.com", "age": 34, "tags": ["travel", "books"]}'


def llguidance_engine(hf, vocab_size, eos):
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos)
    bits = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def compile_schema():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "})
        return llguidance.LLMatcher(tokenizer, grammar)

    def mask(matcher):
        llguidance.numpy.fill_next_token_bitmask(matcher, bits)
        return bits[0].copy()

    def consume(matcher, token):
        assert matcher.consume_token(token), matcher.get_error()

    return compile_schema, mask, consume, lambda matcher, n: matcher.rollback(n)


def xgrammar_engine(hf, vocab_size, eos):
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info)
    bits = xgrammar.allocate_token_bitmask(1, vocab_size)

    def compile_schema():
        return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))

    def mask(matcher):
        matcher.fill_next_token_bitmask(bits)
        return bits[0].numpy().copy()

    def consume(matcher, token):
        assert matcher.accept_token(token)

    return compile_schema, mask, consume, lambda matcher, n: matcher.rollback(n)


def outlines_core_engine(hf, vocab_size, eos):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    tokens = {}  # each id's bytes: SentencePiece writes a space as "▁" and a byte as "<0xNN>"
    for piece, i in hf.get_vocab().items():
        if piece.startswith("<0x") and len(piece) == 6:
            tokens.setdefault(bytes([int(piece[3:5], 16)]), []).append(i)
        elif i not in eos and not (piece.startswith("<") and piece.endswith(">")):
            tokens.setdefault(piece.replace("▁", " ").encode(), []).append(i)
    vocabulary = Vocabulary(eos[0], tokens)  # (one EOS id only)
    regex = build_regex_from_schema(json.dumps(SCHEMA))

    def compile_schema():
        return Guide(Index(regex, vocabulary), max_rollback=64)  # (its default keeps 32 states)

    bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def mask(guide):
        guide.write_mask_into(bits.ctypes.data, bits.size, 4)
        return bits.copy()

    def consume(guide, token):
        guide.advance(token)

    return compile_schema, mask, consume, lambda guide, n: guide.rollback_state(n)


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_core_engine}


def measure(engine, ids, repeats):
    compile_schema, mask, consume, rollback = engine
    tic = time.perf_counter()
    matcher = compile_schema()
    compile_ms = (time.perf_counter() - tic) * 1e3
    first, best = mask(matcher), None
    for _ in range(repeats):
        times = []
        for token in ids:
            tic = time.perf_counter()
            mask(matcher)
            times.append((time.perf_counter() - tic) * 1e3)
            consume(matcher, token)
        rollback(matcher, len(ids))
        best = times if best is None or sum(times) < sum(best) else best
    exact = np.array_equal(mask(matcher), first)
    return compile_ms, statistics.median(best), max(best), exact


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=5, help="passes over the reply (the fastest counts)")
    args = parser.parse_args()
    from transformers import PreTrainedTokenizerFast

    directory = ensure_target()  # the embedded target, converted on first use
    hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    vocab_size = config.get("vocab_size") or config["text_config"]["vocab_size"]
    eos = [hf.convert_tokens_to_ids(t) for t in ("<eos>", "<end_of_turn>")]
    ids = hf.encode(REPLY, add_special_tokens=False)  # (complete after its last id: no EOS to consume)
    print(f"tokenizer: {vocab_size} ids; reply: {len(ids)} tokens")
    print(f"{'engine':<15}{'build ms':>10}{'compile ms':>12}{'mask median ms':>16}{'mask max ms':>13}  rollback")
    for name in args.engines.split(","):
        try:
            tic = time.perf_counter()
            engine = ENGINES[name](hf, vocab_size, eos)
            build = (time.perf_counter() - tic) * 1e3
        except ImportError as e:
            print(f"{name:<15}not installed ({e.name})")
            continue
        compile_ms, median, worst, exact = measure(engine, ids, args.repeats)
        print(f"{name:<15}{build:>10.0f}{compile_ms:>12.1f}{median:>16.3f}{worst:>13.3f}  {'exact' if exact else 'DIFFERS'}")


if __name__ == "__main__":
    main()
