"""What the commands show on the terminal besides the text: status lines, statistics, the chat banner."""

from typing import List, Optional

from rich.console import Console

from ..checkpoints.pair import Pair
from ..checkpoints.registry import DIALOGUE
from ..engine.stats import Stats
from . import RANK

COMMANDS = "/reset  /stats  /system TEXT  /exit"
IMAGE_COMMAND = "/image PATH  "  # for a target with a vision tower


def status(message: str):
    if RANK:
        return
    Console(stderr=True, soft_wrap=True).print(message, style="dim", markup=False, highlight=False)


def summary_line(stats: Stats, finish_reason: Optional[str] = None, tps: Optional[float] = None) -> str:
    """Tokens, tokens/s (`tps` for a batch: rows overlap in time), acceptance, accepted length."""
    tps = stats.generation_tps if tps is None else tps
    parts = [f"{stats.generation_tokens} tokens", f"{tps:.1f} tok/s"]
    if stats.drafted_tokens:
        parts += [f"acceptance {stats.acceptance_rate:.2f}", f"mean accepted length {stats.mean_accepted_length:.2f}"]
    else:
        parts.append("no drafts")
    if finish_reason == "length":
        parts.append("stopped at max tokens")
    elif finish_reason == "context":
        parts.append("stopped at the end of the context")
    return ", ".join(parts)


def details(stats: Stats) -> List[str]:
    """Per-position and per-source acceptance, and prompt processing."""
    lines = [f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s"]
    if stats.drafted_tokens:
        lines.append("acceptance by position: " + " ".join(f"{a:.2f}" for a in stats.per_position_acceptance))
        lines.append("acceptance by source: " + sources(stats.by_source))
    return lines


def sources(by_source: dict) -> str:
    return ", ".join(f"{s} {e['acceptance']:.2f} ({e['rounds']} rounds)" for s, e in by_source.items())


def commands(pair: Pair) -> str:
    return (IMAGE_COMMAND if pair.target.vision is not None else "") + COMMANDS


def banner(pair: Pair, target: Optional[str]) -> List[str]:
    """What this model is, how it is asked (base models: see conversation.py), and the commands."""
    name = pair.name or target
    lines = [f"{name} ({pair.label})" if pair.label else name]
    if pair.chat == DIALOGUE:
        lines.append(
            "a base model, not instruction-tuned: it continues a plain-text dialogue (short, often wrong "
            "answers); for a real assistant run `mlx-mtp chat -m gemma-4-e2b` on a Mac"
        )
    lines.append(f"{commands(pair)}; Ctrl-C stops a reply, Ctrl-D exits")
    return lines


def distributed_lines(layout: Optional[dict]) -> List[str]:
    """Each rank's share of a pipeline-sharded target."""
    if layout is None:
        return []
    lines = [f"pipeline over {layout['world_size']} ranks (rank 0: last layers, head, drafter):"]
    for r in layout["ranks"]:
        first, last = r["layers"]
        lines.append(f"  rank {r['rank']}: layers {first}..{last}, {r['weight_bytes'] / 1e6:.1f} MB of target weights")
    return lines
