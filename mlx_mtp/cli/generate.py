"""`mlx-mtp generate`: one prompt, streamed; or a file of prompts, batched."""

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, List, Optional

import typer

import mlx_mtp

from ..api import batch_generate
from ..bench.runner import load_prompts
from ..conversation import render, stop_strings
from ..engine.stats import Stats
from ..images import read_bytes
from . import app, fail, one_line_errors, options
from .display import details, status, summary_line


@app.command()
@one_line_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - reads it from stdin.")] = None,
    model: options.ModelOption = None,
    target: options.TargetOption = None,
    drafter: options.DrafterOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temp: options.TempOption = 0.0,
    top_p: options.TopPOption = 1.0,
    top_k: options.TopKOption = 0,
    min_p: options.MinPOption = 0.0,
    seed: options.SeedOption = None,
    draft_tokens: options.DraftTokensOption = None,
    no_draft: options.NoDraftOption = False,
    proposer: options.ProposerOption = "hybrid",
    chat: Annotated[
        bool, typer.Option("--chat", help="Send the prompt as a user turn, framed as `chat` frames it.")
    ] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (text, ids, stats), one line per prompt.")
    ] = False,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="One prompt per line, instead of PROMPT.")
    ] = None,
    # Checked below, not with min=: "--batch needs --prompts-file and a size >= 1" covers both.
    batch: Annotated[
        Optional[int],
        typer.Option("--batch", help="Rows of --prompts-file decoded at once; the next joins as one ends. Default: 1."),
    ] = None,
    image: Annotated[
        Optional[List[Path]],
        typer.Option("--image", help="An image the prompt is about (repeatable; a multimodal Gemma 4 target)."),
    ] = None,
    verbose: options.VerboseOption = False,
):
    """Complete one prompt, streaming the text as it is committed; or a file of prompts in batches."""
    request = options.request_from_flags(max_tokens, temp, top_p, top_k, min_p, seed, 0 if no_draft else draft_tokens)
    if (prompt is None) == (prompts_file is None):
        fail("give either a PROMPT (- for stdin) or --prompts-file")
    if batch is not None and (prompts_file is None or batch < 1):
        fail("--batch needs --prompts-file and a size >= 1")
    prompts = load_prompts(prompts_file)["file"] if prompts_file else [sys.stdin.read() if prompt == "-" else prompt]
    if not prompts[0]:
        fail("the prompt is empty")
    if image and prompts_file:
        fail("--image goes with one PROMPT, not --prompts-file")
    pictures = [read_bytes(path) for path in image or []]  # (unreadable files fail before the model loads)
    options.check_proposers([proposer])
    pair = options.pair_from_flags(model, target, drafter, verbose, proposer)
    pictures = mlx_mtp.prepare_images(pair, pictures)
    if chat:  # the chat template, or for a base target the dialogue `chat` uses, with its stops
        parts = [{"type": "image"} for _ in pictures]
        prompts = [render(pair, [{"role": "user", "content": parts + [{"type": "text", "text": p}] if parts else p}])
                   for p in prompts]
        request = replace(request, stop=request.stop + tuple(stop_strings(pair)))
    options.measure_costs_once(pair)
    kwargs = {"request": request, "proposer": proposer}
    if pictures:
        kwargs["images"] = pictures
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
