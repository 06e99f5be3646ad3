"""Check a real pair on this machine and write one report to share.

    python scripts/check_pair.py gemma-4-e2b                 # an alias of models.toml
    python scripts/check_pair.py --target DIR_OR_REPO --drafter DIR_OR_REPO

What it runs: every built-in bench prompt once, greedy, with plain mlx-lm and with mlx-mtp on
the same loaded target, interleaved (as `mlx-mtp bench --repeats 1`), K chosen each round.
What it reports (README, "Checking a pair"): whether every greedy output is identical to
mlx-lm's, the speedup, acceptance by draft position and by source, tokens per target forward,
the measured cost curve, and memory: the bytes of the target's and the drafter's weights and
the peak memory of the run. The report is printed and written as JSON (`--json-out`).
"""

import argparse
import json
import resource
import sys
from pathlib import Path

import mlx_mtp  # loads MKL before mlx where available
import mlx.core as mx
from rich.console import Console

from mlx_mtp.bench.report import bench_tables, report
from mlx_mtp.bench.runner import benchmark, load_prompts, plan
from mlx_mtp.models.pipeline import weight_bytes
from mlx_mtp.checkpoints.registry import TEMPLATE
from mlx_mtp.cli.display import sources
from mlx_mtp.engine.stats import Stats


def peak_memory() -> dict:
    """MLX's own peak (Metal counts it; on the CPU it reads 0) and the process's largest
    resident set (ru_maxrss is bytes on macOS, KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mlx_peak": mx.get_peak_memory(), "max_rss": rss if sys.platform == "darwin" else rss * 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="an alias of models.toml")
    parser.add_argument("--target")
    parser.add_argument("--drafter")
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("--json-out", type=Path, default=Path("check_pair.json"))
    args = parser.parse_args()
    if (args.model is None) == (args.target is None):
        parser.error("give an alias or --target (with --drafter)")
    if not args.json_out.parent.is_dir():  # find out now, not after the whole run
        parser.error(f"--json-out: no directory {args.json_out.parent}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    try:
        pair = mlx_mtp.load(args.model) if args.model else mlx_mtp.load(args.target, args.drafter)
    except ValueError as e:  # mlx_mtp.LoadError: an unknown alias, a pair that does not fit
        parser.exit(1, f"error: {e}\n")
    if pair.drafter is None:
        parser.error("the pair has no drafter")
    template = pair.chat == TEMPLATE
    tasks = plan(pair, load_prompts(), [0.0], [None], 1, template=template)
    mx.reset_peak_memory()
    runs = []
    for run in benchmark(pair, tasks, args.max_tokens):
        runs.append(run)
        print(f"{run.task.setting.kind} #{run.task.prompt}: identical {run.identical}, "
              f"{run.mtp_tps / run.baseline_tps:.2f}x", file=sys.stderr)
    config = {"max_tokens": args.max_tokens, "repeats": 1, "prompts": "built-in",
              "prompt_format": "chat template" if template else "plain text, a base model", "proposers": ["hybrid"]}
    result = report(pair, runs, config)
    pooled = Stats.pooled([r.stats for r in runs])
    result["check"] = {
        "identical": all(r.identical for r in runs),
        "runs": len(runs),
        "acceptance": pooled.acceptance_rate,
        "per_position_acceptance": pooled.per_position_acceptance,
        "by_source": pooled.by_source,
        "mean_accepted_length": pooled.mean_accepted_length,
        "target_weight_bytes": weight_bytes(pair.target.model),
        "drafter_weight_bytes": weight_bytes(pair.drafter),
        **peak_memory(),
    }
    console = Console(highlight=False)
    console.print(*bench_tables(result))
    c = result["check"]
    console.print(
        f"greedy identical to mlx-lm: {'yes' if c['identical'] else 'NO'} ({c['runs']} prompts)\n"
        f"acceptance {c['acceptance']:.2f}, by position {' '.join(f'{a:.2f}' for a in c['per_position_acceptance'])}, "
        f"tokens per forward {c['mean_accepted_length']:.2f}\n"
        f"by source: {sources(c['by_source'])}\n"
        f"weights: target {c['target_weight_bytes'] / 2**20:.0f} MiB, drafter {c['drafter_weight_bytes'] / 2**20:.1f} MiB; "
        f"peak: MLX {c['mlx_peak'] / 2**20:.0f} MiB, process {c['max_rss'] / 2**20:.0f} MiB"
    )
    args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"report written to {args.json_out}")
    sys.exit(0 if c["identical"] else 1)


if __name__ == "__main__":
    main()
