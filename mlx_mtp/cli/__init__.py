"""The `mlx-mtp` command: chat, generate, serve, bench and models, a thin layer over the library.

Every bad input ends in one line on stderr and a non-zero exit; `--verbose` shows the
traceback instead. Flags follow mlx-lm's where it has them.
"""

import functools
from dataclasses import replace
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import mlx.core as mx
import transformers
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import mlx_mtp

from ..models import blas

from ..models import pipeline

from ..checkpoints import registry
from ..bench.runner import benchmark, load_prompts, plan, report
from ..api import batch_generate
from ..checkpoints.pair import Pair
from ..checkpoints.registry import DIALOGUE, TEMPLATE
from ..conversation import Conversation, apply_template, render
from ..decoding.proposers import PROPOSERS, make_proposer
from ..decoding.sampling import SamplingParams
from ..engine.stats import Stats
from ..models.cache import MAX_DRAFT_TOKENS
from ..request import GenerationRequest

COMMANDS = "/reset  /stats  /system TEXT  /exit"


# typer >= 0.29 vendors click, so its usage errors are not `click`'s: take the class from typer.
UsageError = typer.BadParameter.__mro__[1]


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a missing argument, a flag of the wrong type) as one line too."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as e:
            fail(e.format_message(), e.exit_code)
        # Without standalone mode, typer returns the code of a `typer.Exit` (e.g. 130 on Ctrl-C).
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Exact speculative decoding on MLX with multi-token-prediction drafters.",
)


# Under `mlx.launch`, every rank runs the command and rank 0 alone talks to the user; the
# others only report their own errors, named by rank.
RANK = int(os.environ["MLX_RANK"]) if os.environ.get("MLX_RANK", "").isdigit() else 0


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context):
    # transformers' own warnings (e.g. a prompt longer than the tokenizer's maximum) would
    # break one-line errors; the library reports those conditions itself.
    transformers.logging.set_verbosity_error()
    if RANK:
        sys.stdout = open(os.devnull, "w")
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def fail(message: str, code: int = 1):
    typer.echo(f"{f'rank {RANK}: ' if RANK else ''}error: {message}", err=True)
    sys.exit(code)


def one_line_errors(command):
    """Library errors (bad pair, bad file, bad value) as one line; the traceback with --verbose."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as e:  # mlx_mtp.LoadError is a ValueError
            if kwargs.get("verbose"):
                raise
            if RANK and isinstance(e, pipeline.PipelineError):
                sys.exit(1)  # every rank finds the same: rank 0 says it once
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper


# Options shared by the commands, named as in mlx-lm.
Model = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="A pair from models.toml (see `mlx-mtp models`). Default: the embedded pair."),
]
Target = Annotated[Optional[str], typer.Option(help="Target: a local directory or a Hugging Face repo id.")]
Drafter = Annotated[Optional[str], typer.Option(help="Drafter for --target: a local directory or a repo id.")]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set with this mass.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 keeps all.")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below this fraction of the top probability.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
DraftTokens = Annotated[
    Optional[int],
    typer.Option("--draft-tokens", help="Tokens drafted per round (K). Default: chosen each round, up to the pair's."),
]
NoDraft = Annotated[bool, typer.Option("--no-draft", help="Plain decoding of the target, for comparison.")]
Proposer = Annotated[
    str,
    typer.Option(
        "--proposer", help="Who drafts: hybrid (n-gram lookup, else the drafter), mtp (the drafter alone) or ngram."
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More statistics; tracebacks on errors.")]


FLAGS = {"max_tokens": "--max-tokens", "num_draft_tokens": "--draft-tokens", "seed": "--seed"}


def request_from_flags(max_tokens: int, temp: float, top_p: float, top_k: int, min_p: float,
                       seed: Optional[int] = None, draft_tokens: Optional[int] = None) -> GenerationRequest:
    """The flags as one request (its prompt comes later): bad values fail before any model
    is loaded (or downloaded), named as the flag that gave them."""
    try:
        return GenerationRequest((), SamplingParams(temp, top_p, top_k, min_p), max_tokens, seed, draft_tokens)
    except ValueError as e:
        message = str(e)
        for name, flag in FLAGS.items():  # (typer has checked that the flag is an integer)
            message = message.replace(f"{name} must be an integer ", f"{flag} must be ")
            if message.startswith(name + " "):
                message = flag + message[len(name):]
        fail(message)


def check_proposers(names: List[str]):
    if not names:
        fail(f"--proposer needs one of {', '.join(PROPOSERS)}")
    for name in names:
        if name not in PROPOSERS:
            fail(f"--proposer must be one of {', '.join(PROPOSERS)}, got {name!r}")


def pair_from_flags(model: Optional[str], target: Optional[str], drafter: Optional[str], verbose: bool,
                    proposer: str = "hybrid") -> Pair:
    """The pair named by -m, by --target/--drafter, or the default pair, drafting with `proposer`."""
    if target is None:
        if drafter is not None:
            fail("--drafter needs --target")
        entry = registry.find_pair(model) if model else registry.default_pair()
        if entry is None and model:
            known = ", ".join(registry.load_registry())
            fail(f"unknown model {model!r} (known: {known}); use --target/--drafter for paths and repo ids")
        if entry is None:
            fail("no model named and no default pair installed: pass -m ALIAS (see `mlx-mtp models`) or --target")
        args = (entry.alias,)
    elif model:
        fail("give either --model or --target/--drafter, not both")
    else:
        args = (target, drafter)
    tic = time.perf_counter()
    pair = mlx_mtp.load(*args)
    make_proposer(proposer, pair.target, pair.drafter, pair.drafter_on_rank_0)  # ValueError: no drafter for "mtp"
    if verbose:
        status(
            f"loaded {pair.name or target} in {time.perf_counter() - tic:.1f} s: "
            f"{pair.target.model_type} target, {'a' if pair.drafter else 'no'} drafter, "
            f"K={pair.default_draft_tokens}, on {mx.default_device()}"
        )
        status(blas.describe())
        for line in distributed_lines(pair.distributed):
            status(line)
    return pair


def distributed_lines(layout: Optional[dict]) -> List[str]:
    """Each rank's share of a pipeline-sharded target."""
    if layout is None:
        return []
    lines = [f"pipeline over {layout['world_size']} ranks (rank 0: last layers, head, drafter):"]
    for r in layout["ranks"]:
        first, last = r["layers"]
        lines.append(f"  rank {r['rank']}: layers {first}..{last}, {r['weight_bytes'] / 1e6:.1f} MB of target weights")
    return lines


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


@app.command()
@one_line_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - reads it from stdin.")] = None,
    model: Model = None,
    target: Target = None,
    drafter: Drafter = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    draft_tokens: DraftTokens = None,
    no_draft: NoDraft = False,
    proposer: Proposer = "hybrid",
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user turn of the chat template.")] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (text, ids, stats), one line per prompt.")
    ] = False,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="One prompt per line, instead of PROMPT.")
    ] = None,
    batch: Annotated[
        Optional[int],
        typer.Option("--batch", help="Rows of --prompts-file decoded at once; the next joins as one ends. Default: 1."),
    ] = None,
    verbose: Verbose = False,
):
    """Complete one prompt, streaming the text as it is committed; or a file of prompts in batches."""
    request = request_from_flags(max_tokens, temp, top_p, top_k, min_p, seed, 0 if no_draft else draft_tokens)
    if (prompt is None) == (prompts_file is None):
        fail("give either a PROMPT (- for stdin) or --prompts-file")
    if batch is not None and (prompts_file is None or batch < 1):
        fail("--batch needs --prompts-file and a size >= 1")
    prompts = load_prompts(prompts_file)["file"] if prompts_file else [sys.stdin.read() if prompt == "-" else prompt]
    if not prompts[0]:
        fail("the prompt is empty")
    check_proposers([proposer])
    pair = pair_from_flags(model, target, drafter, verbose, proposer)
    if chat:
        prompts = [apply_template(pair, [{"role": "user", "content": p}]) for p in prompts]
    kwargs = {"request": request, "proposer": proposer}
    name = pair.name or target

    if prompts_file:
        # Continuous batching: `--batch` rows at a time, the next prompt joining as one ends.
        results = batch_generate(pair, prompts, max_batch=batch or 1, seed=seed, **kwargs)
        for i, r in enumerate(results):
            if json_:
                row = {"prompt": i, "model": name, "text": r.text, "tokens": r.tokens, "distributed": pair.distributed}
                typer.echo(json.dumps({**row, "finish_reason": r.finish_reason, "stats": r.stats.to_dict()}))
            else:
                typer.echo(f"--- prompt {i + 1} ---\n{r.text}")
        if not json_:
            stats = Stats.pooled([r.stats for r in results])
            status(f"prompts 1-{len(results)}: " + summary_line(stats, tps=results.stats.generation_tps))
        return

    if json_:
        out = mlx_mtp.generate(pair, prompts[0], **kwargs)
        result = {"model": name, "text": out.text, "tokens": out.tokens, "finish_reason": out.finish_reason,
                  "distributed": pair.distributed}
        typer.echo(json.dumps({**result, "stats": out.stats.to_dict()}))
        return
    text = ""
    for response in mlx_mtp.stream_generate(pair, prompts[0], **kwargs):
        text = response.text or text
        sys.stdout.write(response.text)
        sys.stdout.flush()
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    status(summary_line(response.stats, response.finish_reason))
    if verbose:
        for line in details(response.stats):
            status(line)


@contextmanager
def deferred_interrupt():
    """Ctrl-C sets an event instead of raising: the reply stops between rounds, never inside
    one, so the prompt cache always holds exactly the committed tokens."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def stream_reply(conversation: Conversation, text: str, console: Console, verbose: bool, **kwargs):
    with deferred_interrupt() as stop:
        stream = conversation.reply(text, interrupt=stop, **kwargs)  # ends after the round under way
        response = None
        try:
            for response in stream:
                console.file.write(response.text)
                console.file.flush()
        finally:
            stream.close()
    if response is None:
        return
    console.print()
    line = summary_line(response.stats, response.finish_reason)
    console.print(("[stopped] " if response.finish_reason == "interrupted" else "") + line, style="dim", markup=False)
    if verbose:
        for line in details(response.stats):
            console.print(line, style="dim")


def print_stats(conversation: Conversation, console: Console):
    if not conversation.replies:
        console.print("no replies yet", style="dim")
        return
    stats = Stats.pooled(conversation.replies)
    console.print(f"{len(conversation.replies)} replies: {summary_line(stats)}")
    for line in details(stats):
        console.print(line)


def banner(pair: Pair, target: Optional[str]) -> List[str]:
    """What this model is, how it is asked (base models: see chat.py), and the commands."""
    name = pair.name or target
    lines = [f"{name} ({pair.label})" if pair.label else name]
    if pair.chat == DIALOGUE:
        lines.append(
            "a base model, not instruction-tuned: it continues a plain-text dialogue (short, often wrong "
            "answers); for a real assistant run `mlx-mtp chat -m gemma-4-e2b` on a Mac"
        )
    lines.append(f"{COMMANDS}; Ctrl-C stops a reply, Ctrl-D exits")
    return lines


@app.command()
@one_line_errors
def chat(
    model_name: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Same as --model.")] = None,
    model: Model = None,
    target: Target = None,
    drafter: Drafter = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per reply.")] = 256,
    temp: Temp = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    draft_tokens: DraftTokens = None,
    no_draft: NoDraft = False,
    proposer: Proposer = "hybrid",
    verbose: Verbose = False,
):
    """Multi-turn chat in the terminal; each turn reuses the prompt cache of the earlier ones."""
    if model_name and model:
        fail("give the model once, as MODEL or --model")
    request = request_from_flags(max_tokens, temp, top_p, top_k, min_p, seed, 0 if no_draft else draft_tokens)
    check_proposers([proposer])
    pair = pair_from_flags(model_name or model, target, drafter, verbose, proposer)
    conversation = Conversation(pair)
    render(pair, [{"role": "user", "content": "hi"}])  # no chat template: fail now, not at turn 1
    kwargs = {"request": request, "proposer": proposer}
    console = Console(highlight=False, soft_wrap=True)
    for line in banner(pair, target):
        console.print(line, style="dim", markup=False)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
            console.print()
            continue
        command, _, argument = line.strip().partition(" ")
        if command == "/exit":
            return
        elif command == "/reset":
            conversation.reset()
            console.print("new conversation", style="dim")
        elif command == "/stats":
            print_stats(conversation, console)
        elif command == "/system":
            conversation.set_system(argument.strip())
            console.print(f"system prompt {'set' if argument.strip() else 'cleared'}", style="dim")
        elif command.startswith("/"):
            console.print(f"unknown command {command}; commands: {COMMANDS}", style="dim", markup=False)
        elif line.strip():
            try:
                stream_reply(conversation, line, console, verbose, **kwargs)
            except ValueError as e:  # e.g. the context is full: the conversation goes on
                console.print(f"error: {e} (/reset starts a new conversation)", style="red", markup=False)
            kwargs["request"] = replace(request, seed=None)  # seed once per session, not every turn


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
    model: Model = None,
    target: Target = None,
    drafter: Drafter = None,
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", help="One prompt per line, instead of the built-in sets.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per run.")] = 128,
    temp: Annotated[str, typer.Option("--temp", help="Temperatures, comma-separated (0: greedy, checked).")] = "0",
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first run (run i uses seed + i).")] = 0,
    draft_tokens: Annotated[
        Optional[str],
        typer.Option("--draft-tokens", help="Draft lengths, comma-separated, e.g. auto,2,4 (auto: chosen each round)."),
    ] = "auto",
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each prompt and setting.")] = 3,
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
    verbose: Verbose = False,
):
    """Plain mlx-lm against mlx-mtp on the same loaded target, interleaved, with medians."""
    temperatures = parse_list(temp, float, "--temp") or [0.0]
    ks = parse_list(draft_tokens, lambda v: None if v.strip() == "auto" else int(v), "--draft-tokens")
    batches = parse_list(batch, int, "--batch")
    proposers = parse_list(proposer, str.strip, "--proposer")
    for t in temperatures:
        for k in ks or [None]:
            request_from_flags(max_tokens, t, top_p, top_k, min_p, draft_tokens=k)
    check_proposers(proposers)
    if max_tokens < 1:  # both libraries must stop at the same length to be compared
        fail(f"bench needs --max-tokens >= 1, got {max_tokens}")
    if repeats < 1:
        fail(f"--repeats must be >= 1, got {repeats}")
    if any(b < 1 for b in batches):
        fail(f"--batch sizes must be >= 1, got {batch}")
    if json_out and not json_out.parent.is_dir():  # find out now, not after the whole run
        fail(f"--json-out: no directory {json_out.parent}")
    if pipeline.launched():
        fail("bench compares with plain mlx-lm in one process: run it without mlx.launch "
             "(generate --json gives a sharded run's speed)")
    prompt_sets = load_prompts(prompts)
    pair = pair_from_flags(model, target, drafter, verbose)
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
        plain = f"plain mlx-lm: {costs['plain'] * 1000:.0f} ms a token; " if costs.get("plain") else ""
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


@app.command()
@one_line_errors
def serve(
    model: Model = None,
    target: Target = None,
    drafter: Drafter = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests decoded together.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting for a row; past it: HTTP 429.")] = 32,
    draft_tokens: Annotated[
        str, typer.Option("--draft-tokens", help="Tokens drafted per round: auto (chosen each round) or K.")
    ] = "auto",
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY'.")] = None,
    cache_mb: Annotated[int, typer.Option("--cache-mb", help="Memory for kept conversations (MB).")] = 1024,
    verbose: Verbose = False,
):
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from ..serve.app import serve as run_server

    k = None if draft_tokens == "auto" else int(draft_tokens) if draft_tokens.isdigit() else -1
    if k is not None and not 0 <= k <= MAX_DRAFT_TOKENS:
        fail(f"--draft-tokens must be auto or in 0..{MAX_DRAFT_TOKENS}, got {draft_tokens!r}")
    if max_batch < 1 or max_queue < 0 or cache_mb < 0 or not 0 < port < 65536:
        fail("--max-batch must be >= 1, --max-queue and --cache-mb >= 0, --port in 1..65535")
    pair = pair_from_flags(model, target, drafter, verbose)
    name = pair.name or target
    ready = lambda: status(f"serving {name} at http://{host}:{port}/v1 (max batch {max_batch}); Ctrl-C stops")
    try:
        run_server(pair, name, host, port, max_batch, max_queue, k, api_key, cache_mb, on_ready=ready)
    except KeyboardInterrupt:
        status("stopped")


@app.command()
@one_line_errors
def models():
    """The named pairs of models.toml: sizes, and what is already downloaded."""
    entries = list(registry.load_registry().values())
    default = registry.default_pair()
    table = Table(box=box.SIMPLE_HEAD)
    for name in ["alias", "target / drafter", "size", "downloaded"]:
        table.add_column(name, overflow="fold")
    for entry, (t, d) in zip(entries, registry.presence(entries)):
        alias = entry.alias + (" (default)" if default and entry.alias == default.alias else "")
        target = "built on first use" if entry.kind == registry.EMBEDDED else entry.target
        downloaded = {(True, True): "yes", (True, False): "target", (False, True): "drafter"}.get(
            (t.local, d.local), "no"
        )
        size = " + ".join(_size(p.size) for p in (t, d) if p.size is not None) or "?"
        table.add_row(alias, f"{target}\n{entry.drafter}", size, downloaded)
        table.add_row("", f"[dim]{escape(entry.note)} (K={entry.draft_tokens})[/]", end_section=True)
    Console(highlight=False).print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def main():
    app()
