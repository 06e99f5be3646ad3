"""What a bench run reports: medians per setting, overall speedups, the JSON document, the tables."""

import math
import os
import platform
import statistics
from dataclasses import asdict, replace
from importlib.metadata import version
from typing import Dict, List, Optional

import mlx.core as mx
from rich import box
from rich.table import Table

from ..checkpoints.pair import Pair
from ..engine.costs import CostModel, Costs, speedup_bound
from ..engine.stats import Stats
from .runner import Run, Setting


def summarize(runs: List[Run], costs: Optional[Costs] = None) -> dict:
    """One entry per setting (medians of tokens/s over its runs) and the overall speedup.

    Overall speedups are geometric means of the settings' speedups, so every kind of prompt
    weighs the same whatever its length: `overall` has one per setting but its kind (e.g. per
    proposer), `overall_speedup` is over every setting. Batched settings also compare mlx-mtp with
    itself at B = 1 (`vs_batch_1`), when B = 1 was measured. Unbatched settings get the
    `bound` their rounds allow at the measured single-row `costs` (`engine.costs.speedup_bound`).
    """
    groups: Dict[Setting, List[Run]] = {}
    for run in runs:
        groups.setdefault(run.task.setting, []).append(run)
    medians = {s: statistics.median(r.mtp_tps for r in rs) for s, rs in groups.items()}
    summary = []
    for setting, rs in groups.items():
        stats = Stats.pooled([r.stats for r in rs])
        baseline, mtp = statistics.median(r.baseline_tps for r in rs), medians[setting]
        entry = {
            "kind": setting.kind,
            "temperature": setting.temperature,
            "draft_tokens": setting.k_label,
            "proposer": setting.proposer,
            "baseline_tps": baseline,
            "mtp_tps": mtp,
            "speedup": mtp / baseline if baseline else 0.0,
            "acceptance": stats.acceptance_rate,
            "mean_accepted_length": stats.mean_accepted_length,
            "per_position_acceptance": stats.per_position_acceptance,
            "by_source": stats.by_source,
            "identical": None if setting.temperature > 0 else all(r.identical for r in rs),
            "runs": len(rs),
        }
        if costs is not None and not setting.batch:
            entry["bound"] = speedup_bound(costs, stats)
        if setting.batch:
            alone = medians.get(replace(setting, batch=1))
            entry["batch"] = setting.batch
            entry["vs_batch_1"] = mtp / alone if alone else None
            # Row i pooled over the runs, and how often each K was chosen.
            entry["row_acceptance"] = [Stats.pooled(row).acceptance_rate for row in zip(*(r.row_stats for r in rs))]
            chosen = [k for r in rs for k in r.draft_tokens_chosen]
            entry["draft_tokens_chosen"] = {k: chosen.count(k) for k in sorted(set(chosen))}
        summary.append(entry)
    by_setting: Dict[tuple, List[float]] = {}  # the setting but its kind -> speedups of its kinds
    for entry in summary:
        key = (entry["proposer"], entry["temperature"], entry["draft_tokens"], entry.get("batch"))
        by_setting.setdefault(key, []).append(entry["speedup"])
    overall = [
        {"proposer": p, "temperature": t, "draft_tokens": k, "batch": b, "speedup": geometric_mean(speedups)}
        for (p, t, k, b), speedups in by_setting.items()
    ]
    return {"summary": summary, "overall": overall, "overall_speedup": geometric_mean([e["speedup"] for e in summary])}


def geometric_mean(speedups: List[float]) -> float:
    speedups = [x for x in speedups if x > 0]
    if len(speedups) == 1:  # its own mean to the bit (exp(log(x)) may miss it by one)
        return speedups[0]
    return math.exp(statistics.fmean(map(math.log, speedups))) if speedups else 0.0


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(mx.default_device()),
        "device_info": mx.device_info(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx-lm": version("mlx-lm"),
        "mlx-mtp": version("mlx-mtp"),
    }


def report(pair: Pair, runs: List[Run], config: dict) -> dict:
    """The --json-out document: summary, overall speedup, every run, machine and settings."""
    costs = CostModel.of(pair).measured
    return {
        **summarize(runs, costs.get(1)),
        "runs": [r.to_dict() for r in runs],
        "model": pair.name,
        "config": config,
        # Seconds: target[n - 1] for a forward over n new tokens, draft_step for one drafter
        # step; for one row (what the bounds use and auto K chooses from), and by batch size.
        "costs": asdict(costs[1]) if 1 in costs else None,
        "costs_by_batch": {b: asdict(c) for b, c in sorted(costs.items())},
        # T(n) / P: a forward over n tokens against one plain mlx-lm step, n = 1, 2, ...
        "target_vs_plain": [t / costs[1].plain for t in costs[1].target] if 1 in costs and costs[1].plain else None,
        "machine": machine_info(),
    }


def _fraction(x: float) -> str:
    return f"{x:.2f}".lstrip("0")


def overall_speedups(overall: List[dict]) -> str:
    """"2.31x", or with several settings one per setting, named by what differs between
    them: "hybrid 2.31x, mtp 1.54x"."""
    if len(overall) == 1:
        return f"{overall[0]['speedup']:.2f}x"
    names = {"proposer": "{}", "temperature": "T={:g}", "draft_tokens": "K={}", "batch": "B={}"}
    varying = [key for key in names if len({str(e[key]) for e in overall}) > 1]
    return ", ".join(" ".join(names[key].format(e[key]) for key in varying) + f" {e['speedup']:.2f}x" for e in overall)


def bench_tables(result: dict) -> List[Table]:
    """Speed (with the bound the costs allow and the greedy identity check), then acceptance:
    each fits 80 columns."""
    rows = result["summary"]
    batched = "batch" in rows[0]
    proposers = len({r["proposer"] for r in rows}) > 1
    costs = result.get("costs")
    title = f"overall speedup {overall_speedups(result['overall'])} ({result['config']['prompt_format']})"
    caption = None
    if costs:
        curve = " ".join(f"{t * 1000:.0f}" for t in costs["target"])
        caption = f"target forward over 1..{len(costs['target'])} tokens: {curve} ms; drafter step {costs['draft_step'] * 1000:.1f} ms"
        plain = ""
        if result.get("target_vs_plain"):
            ratios = " ".join(f"{r:.2f}" for r in result["target_vs_plain"])
            plain = f"plain mlx-lm: {costs['plain'] * 1000:.0f} ms a token (P); T(n)/P: {ratios}; "
        caption += f"\n{plain}bound: the speedup these rounds allow at these costs"
    speed = Table(title=title, caption=caption, box=box.SIMPLE_HEAD)
    accept = Table(caption="accept: drafted tokens accepted; len: tokens per target forward", box=box.SIMPLE_HEAD)
    setting = ["B" if batched else "kind", "T", "K"] + ["drafts"] * proposers
    bound = ["bound"] * (not batched)
    for name in setting + ["mlx-lm tok/s", "mlx-mtp tok/s", "speedup"] + bound + ["vs B=1"] * batched + ["same"]:
        speed.add_column(name, justify="left" if name in ("kind", "drafts") else "right")
    detail = ["rows' accept", "K chosen (rounds)"] if batched else ["per position", "by source"]
    for name in setting + ["accept", "len"] + detail:
        accept.add_column(name, justify="right" if name in ("B", "T", "K", "accept", "len") else "left")
    for r in rows:
        cells = [str(r["batch"]) if batched else r["kind"], f"{r['temperature']:g}", str(r["draft_tokens"])]
        cells += [r["proposer"]] * proposers
        ratios = [f"{r['speedup']:.2f}x"]
        if batched:
            ratios.append("-" if r["vs_batch_1"] is None else f"{r['vs_batch_1']:.2f}x")
        else:
            ratios.append("-" if r.get("bound") is None else f"{r['bound']:.2f}x")
        # Greedy outputs must be identical; sampled ones differ by design.
        same = {None: "-", True: "yes", False: "[bold red]NO[/]"}[r["identical"]]
        speed.add_row(*cells, f"{r['baseline_tps']:.1f}", f"{r['mtp_tps']:.1f}", *ratios, same)
        if batched:
            rows_accept = " ".join(_fraction(a) for a in r["row_acceptance"])
            chosen = " ".join(f"{k}:{n}" for k, n in r["draft_tokens_chosen"].items())
            detail = [rows_accept, chosen]
        else:
            positions = " ".join(_fraction(a) for a in r["per_position_acceptance"])
            detail = [positions, ", ".join(f"{s} {_fraction(e['acceptance'])}" for s, e in r["by_source"].items())]
        accept.add_row(*cells, _fraction(r["acceptance"]), f"{r['mean_accepted_length']:.2f}", *detail)
    return [speed, accept]
