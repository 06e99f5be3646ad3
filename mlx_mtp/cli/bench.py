"""`mlx-mtp bench`: plain mlx-lm against mlx-mtp on one loaded target (the runs: bench/runner.py)."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..bench.report import bench_tables, report
from ..bench.runner import benchmark, load_prompts, plan
from ..checkpoints.registry import TEMPLATE
from ..conversation import apply_template
from ..models import pipeline
from . import app, fail, one_line_errors, options
from .display import summary_line


def parse_list(value: Optional[str], kind, flag: str) -> list:
    if value is None:
        return []
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} takes comma-separated values, got {value!r}")


@app.command()
@one_line_errors
def bench(
    model: options.ModelOption = None,
    target: options.TargetOption = None,
    drafter: options.DrafterOption = None,
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", help="One prompt per line, instead of the built-in sets.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per run.")] = 128,
    temp: Annotated[str, typer.Option("--temp", help="Temperatures, comma-separated (0: greedy, checked).")] = "0",
    top_p: options.TopPOption = 1.0,
    top_k: options.TopKOption = 0,
    min_p: options.MinPOption = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first run (run i uses seed + i).")] = 0,
    draft_tokens: Annotated[
        Optional[str],
        typer.Option("--draft-tokens", help="Draft lengths, comma-separated, e.g. auto,2,4 (auto: chosen each round)."),
    ] = "auto",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Runs of each prompt and setting.")] = 3,
    quick: Annotated[
        bool, typer.Option("--quick", help="A first look: the first prompt of each set, one run each (--repeats 1).")
    ] = False,
    batch: Annotated[
        Optional[str],
        typer.Option("--batch", help="Batch sizes, e.g. 1,4,8: B prompts at once, against mlx-lm's batch_generate."),
    ] = None,
    proposer: Annotated[
        str, typer.Option("--proposer", help="Who drafts, comma-separated, e.g. hybrid,mtp (see generate --help).")
    ] = "hybrid",
    ignore_chat_template: Annotated[
        bool, typer.Option("--ignore-chat-template", help="Continue the prompts as plain text, without the template.")
    ] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json-out", help="Write the summary and every run.")] = None,
    verbose: options.VerboseOption = False,
):
    """Plain mlx-lm against mlx-mtp on the same loaded target, interleaved, with medians."""
    temperatures = parse_list(temp, float, "--temp") or [0.0]
    ks = parse_list(draft_tokens, lambda v: None if v.strip() == "auto" else int(v), "--draft-tokens")
    batches = parse_list(batch, int, "--batch")
    proposers = parse_list(proposer, str.strip, "--proposer")
    for t in temperatures:
        for k in ks or [None]:
            options.request_from_flags(max_tokens, t, top_p, top_k, min_p, draft_tokens=k)
    options.check_proposers(proposers)
    if max_tokens < 1:  # both libraries must stop at the same length to be compared
        fail(f"bench needs --max-tokens >= 1, got {max_tokens}")
    if any(b < 1 for b in batches):
        fail(f"--batch sizes must be >= 1, got {batch}")
    if json_out and not json_out.parent.is_dir():  # find out now, not after the whole run
        fail(f"--json-out: no directory {json_out.parent}")
    if pipeline.launched():
        fail("bench compares with plain mlx-lm in one process: run it without mlx.launch "
             "(generate --json gives a sharded run's speed)")
    prompt_sets = load_prompts(prompts)
    if quick:
        prompt_sets = {kind: texts[:1] for kind, texts in prompt_sets.items()}
        repeats = 1
    pair = options.pair_from_flags(model, target, drafter, verbose)
    if pair.drafter is None:
        fail("bench compares against a drafter: pass --drafter with --target")
    # A base target echoes templated prompts (and the lookup copies the echo): it continues
    # the prompts as plain text, as --ignore-chat-template asks of any target.
    template = pair.chat == TEMPLATE and not ignore_chat_template
    if template:
        apply_template(pair, [{"role": "user", "content": "hi"}])  # no template: say so before any run
    tasks = plan(pair, prompt_sets, temperatures, ks or [None], repeats, batches, proposers, template)
    runs = []
    err = Console(stderr=True, highlight=False)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        bar = progress.add_task("warming up", total=len(tasks))
        for run in benchmark(pair, tasks, max_tokens, top_p, top_k, min_p, seed):
            runs.append(run)
            s = run.task.setting
            name = f"B={s.batch}" if s.batch else s.kind
            progress.update(bar, advance=1, description=f"{name} T={s.temperature:g} K={s.k_label}")
            if verbose:
                progress.console.print(
                    f"{name} #{run.task.prompt} T={s.temperature:g} K={s.k_label}: mlx-lm "
                    f"{run.baseline_tps:.1f} tok/s, mlx-mtp {run.mtp_tps:.1f} tok/s, {summary_line(run.stats)}"
                )
    config = {
        "max_tokens": max_tokens,
        "repeats": repeats,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "seed": seed,
        "prompts": str(prompts) if prompts else "built-in",
        "prompt_format": "chat template" if template else "plain text" + ("" if ignore_chat_template else ", a base model"),
        "batch": batches or None,
        "proposers": proposers,
    }
    result = report(pair, runs, config)
    Console(highlight=False).print(*bench_tables(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=1) + "\n")
    differ = sum(r.identical is False for r in runs)
    if differ:
        fail(f"greedy outputs of mlx-lm and mlx-mtp differ in {differ} of {len(runs)} runs")
