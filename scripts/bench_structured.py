"""Structured output, measured: JSON-schema replies with speculative decoding against the
same grammar at K = 0 (the target alone, masked), side by side in one process.

    python scripts/bench_structured.py [-m ALIAS] [-n 256] [--repeats 3] [--json-out FILE]

For each prompt and its schema (the bench's structured-output prompts, through the chat
template or the dialogue frame as the server sends them), greedy, interleaved: tokens/s of
mlx-mtp (K chosen each round) and of K = 0 under the same grammar, whether the outputs are
the same ids (they must be), whether the reply parses, and per source (grammar: forced ids
drafted with certainty; mtp, ngram: the proposers) the ids drafted and the share accepted.
"""

import argparse
import json
import statistics
import time

import mlx_mtp
from mlx_mtp import GenerationRequest
from mlx_mtp.bench.report import machine_info
from mlx_mtp.cli.options import measure_costs_once
from mlx_mtp.conversation import render
from mlx_mtp.decoding.grammar import json_grammar
from mlx_mtp.engine.stats import Stats
from mlx_mtp.request import encode

STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))


def obj(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def array(items: dict, n: int) -> dict:
    return {"type": "array", "items": items, "minItems": n, "maxItems": n}


CASES = [
    ("Return a JSON object describing three fictional books, each with title, author, year, genres (a list) and "
     "rating.", obj(books=array(obj(title=STRING, author=STRING, year=INTEGER, genres=array(STRING, 2), rating=NUMBER),
                                3))),
    ("Convert this to JSON with keys name, email, phone and city: Maria Lopez, maria.lopez@example.com, "
     "+34 600 123 456, lives in Valencia.", obj(name=STRING, email=STRING, phone=STRING, city=STRING)),
    ("Produce a JSON array of the seven days of the week, each an object with name, abbreviation and is_weekend.",
     obj(days=array(obj(name=STRING, abbreviation=STRING, is_weekend=BOOLEAN), 7))),
]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def run(pair, ids, grammar, max_tokens, k):
    request = GenerationRequest(ids, max_tokens=max_tokens, draft_tokens=k, grammar=grammar)
    tic = time.perf_counter()
    out = mlx_mtp.generate(pair, ids, request=request)
    return out, len(out.tokens) / (time.perf_counter() - tic)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default="gemma-3-270m", help="a pair from models.toml")
    parser.add_argument("-n", "--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (the median counts)")
    parser.add_argument("--json-out", help="write the results here")
    args = parser.parse_args()
    pair = mlx_mtp.load(args.model)
    measure_costs_once(pair)
    results, pooled = [], []
    print(f"{'prompt':<40}{'K=0 tok/s':>10}{'mtp tok/s':>10}{'speedup':>9}{'tokens':>8}  same  parses  by source")
    for text, schema in CASES:
        ids = encode(pair.tokenizer, render(pair, [{"role": "user", "content": text}]))
        grammar = json_grammar(schema)
        run(pair, ids, grammar, 8, None)  # warm: the grammar library's tokenizer, the first masks
        plain, mtp = [], []
        for _ in range(args.repeats):  # interleaved, so drifts hit both alike
            base, tps = run(pair, ids, grammar, args.max_tokens, 0)
            plain.append(tps)
            spec, tps = run(pair, ids, grammar, args.max_tokens, None)
            mtp.append(tps)
        same, parses = spec.tokens == base.tokens, is_json(spec.text)
        sources = spec.stats.by_source
        pooled.append(spec.stats)
        p, m = statistics.median(plain), statistics.median(mtp)
        shown = ", ".join(f"{s} {v['accepted']}/{v['drafted']}" for s, v in sources.items())
        print(f"{text[:38]:<40}{p:>10.1f}{m:>10.1f}{m / p:>8.2f}x{len(spec.tokens):>8}  {'yes' if same else 'NO':<4}  "
              f"{'yes' if parses else 'no':<6}  {shown}")
        results.append({"prompt": text, "schema": schema, "plain_tps": plain, "mtp_tps": mtp, "speedup": m / p,
                        "tokens": len(spec.tokens), "same": same, "parses": parses, "finish": spec.finish_reason,
                        "by_source": sources, "text": spec.text})
    overall = Stats.pooled(pooled).by_source
    print("all prompts, by source: " + ", ".join(
        f"{s}: {v['accepted']}/{v['drafted']} accepted ({v['acceptance']:.2f})" for s, v in overall.items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine_info(), "model": args.model, "max_tokens": args.max_tokens,
                       "repeats": args.repeats, "results": results, "by_source": overall}, f, indent=1)


if __name__ == "__main__":
    main()
