"""Runs of the library on the fixture pairs, the same in one process and under
`mlx.launch -n N --backend ring` (then pipeline-sharded): tests/test_pipeline.py compares them.

    python tests/pipeline_run.py PAIR...                          # one process
    mlx.launch -n 2 --backend ring -- python tests/pipeline_run.py PAIR...

Prints one JSON object (from rank 0): pair -> scenario -> result.
"""

import json
import sys

import mlx_mtp
from conftest import MLX_LM_PREFILL, ContinuationProposer, load_pair, prompt_of


def run(pair, prompt, **kwargs) -> dict:
    out = mlx_mtp.generate(pair, prompt, **kwargs)
    return {"tokens": out.tokens, "drafts": out.stats.drafts, "finish": out.finish_reason}


def scenarios(name: str) -> dict:
    pair = load_pair(name)
    prompt = prompt_of(40, seed=1)
    out = {f"greedy K={k}": run(pair, prompt, max_tokens=40, num_draft_tokens=k) for k in (0, 1, 3)}
    out["greedy auto K"] = run(pair, prompt, max_tokens=40)
    out["sampled K=3"] = run(pair, prompt, max_tokens=40, num_draft_tokens=3, temperature=0.8, top_p=0.9, seed=7)
    out["sampled K=2 top_k"] = run(pair, prompt, max_tokens=30, num_draft_tokens=2, temperature=1.0, top_k=20,
                                   seed=3)

    if name == "e2b":  # the KV-sharing layers and per-layer inputs cross the ranks
        # Past a prefill chunk and a cache reallocation, with the sliding window wrapped many times.
        long = prompt_of(MLX_LM_PREFILL + 90, seed=2)
        out["long prompt"] = run(pair, long, max_tokens=270, num_draft_tokens=2)

    # Continuous batching: rows of different lengths joining and leaving, greedy and sampled.
    prompts = [prompt_of(n, seed=10 + n) for n in (5, 33, 12, 33)]
    batch = mlx_mtp.batch_generate(pair, prompts, max_tokens=24, num_draft_tokens=2, max_batch=2)
    out["batch greedy"] = [r.tokens for r in batch]
    batch = mlx_mtp.batch_generate(pair, prompts, max_tokens=24, num_draft_tokens=2, max_batch=3,
                                   temperature=0.7, seed=100)
    out["batch sampled"] = [r.tokens for r in batch]

    # A conversation continued across calls.
    cache = mlx_mtp.make_prompt_cache(pair)
    turns = [run(pair, p, max_tokens=12, num_draft_tokens=3, prompt_cache=cache) for p in (prompt[:20], prompt[20:])]
    out["two turns"] = [t["tokens"] for t in turns]

    # Long accepted runs: drafts that are mostly the target's own continuation.
    continuation = mlx_mtp.generate(pair, prompt, max_tokens=48, num_draft_tokens=0).tokens
    oracle = ContinuationProposer([prompt + continuation], noise=0.2, seed=5)
    out["oracle K=4"] = run(pair, prompt, max_tokens=48, num_draft_tokens=4, proposer=oracle)
    out["distributed"] = pair.distributed
    return out


if __name__ == "__main__":
    results = {name: scenarios(name) for name in sys.argv[1:]}
    pipeline = mlx_mtp.models.pipeline.init()
    if pipeline is None or pipeline.last:
        print(json.dumps(results))
