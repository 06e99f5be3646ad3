"""Plain-text continuations on the embedded pair, without the chat template.

`mlx-mtp bench` sends its prompts through the chat template. Gemma 3 270M is a base model,
and under that template its greedy text mostly repeats the prompt, where the n-gram lookup
is right almost every time. This script measures ordinary continuations instead:
plain mlx-lm against mlx-mtp with the hybrid proposer and with the drafter alone, in one
process on the same loaded target, with the same warm-up and interleaving as the bench.

    python scripts/bench_continuations.py [-n 96] [--repeats 2]
"""

import argparse
import json

import mlx_mtp  # loads MKL before mlx where available
from mlx_mtp.bench import Setting, Task, benchmark, summarize
from mlx_mtp.generate import encode

PROMPTS = [
    "The old harbour town woke slowly. Fishermen were mending their nets while",
    "In 1869 the Suez Canal opened, and trade between Europe and Asia",
    "To make a good loaf of bread at home, you first need to",
    "The committee met on Tuesday to discuss the new budget. The chair began by",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out")
    args = parser.parse_args()

    pair = mlx_mtp.load("gemma-3-270m")
    prompts = [encode(pair, p) for p in PROMPTS]
    results = {}
    for name, proposer in (("hybrid", pair.proposer), ("drafter alone", pair.mtp)):
        pair.proposer = proposer
        tasks = [
            Task(Setting(name, 0.0, None), i, [p], r) for i, p in enumerate(prompts) for r in range(args.repeats)
        ]
        runs = list(benchmark(pair, tasks, args.max_tokens))
        (entry,) = summarize(runs)["summary"]
        results[name] = entry
        print(
            f"{name}: mlx-lm {entry['baseline_tps']:.1f} tok/s, mlx-mtp {entry['mtp_tps']:.1f} tok/s, "
            f"speedup {entry['speedup']:.2f}x, acceptance {entry['acceptance']:.2f}, "
            f"per position {[round(a, 2) for a in entry['per_position_acceptance']]}, "
            f"mean accepted length {entry['mean_accepted_length']:.2f}, identical {entry['identical']}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
