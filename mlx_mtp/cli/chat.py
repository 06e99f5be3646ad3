"""`mlx-mtp chat`: a multi-turn conversation in the terminal over one prompt cache."""

import signal
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import Annotated, Optional

import typer
from rich.console import Console

import mlx_mtp

from ..conversation import Conversation, render
from ..engine.stats import Stats
from ..request import ThoughtText
from . import app, fail, one_line_errors, options
from .display import banner, commands, details, summary_line


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
    """The reply as it comes; a thought (where the template has a thinking channel) dimmed,
    a blank line between it and the answer."""
    with deferred_interrupt() as stop:
        stream = conversation.reply(text, interrupt=stop, **kwargs)  # ends after the round under way
        response = thoughts = None
        thought_shown = answer_shown = False
        try:
            for response in stream:
                if thoughts is None:  # (the turn's text is known once it started)
                    thoughts = ThoughtText.of(conversation.pair.tokenizer, conversation.fed) or False
                thought, answer = thoughts.feed(response.text, response.finish_reason is not None) if thoughts \
                    else ("", response.text)
                if thought:
                    console.print(thought, style="dim", end="", markup=False)
                    thought_shown = True
                if answer:
                    if thought_shown and not answer_shown:
                        console.print("\n")
                    console.file.write(answer)
                    answer_shown = True
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


@app.command()
@one_line_errors
def chat(
    model_name: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Same as --model.")] = None,
    model: options.ModelOption = None,
    target: options.TargetOption = None,
    drafter: options.DrafterOption = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens per reply.")] = 256,
    temp: options.TempOption = 0.0,
    top_p: options.TopPOption = 1.0,
    top_k: options.TopKOption = 0,
    min_p: options.MinPOption = 0.0,
    seed: options.SeedOption = None,
    draft_tokens: options.DraftTokensOption = None,
    no_draft: options.NoDraftOption = False,
    proposer: options.ProposerOption = "hybrid",
    verbose: options.VerboseOption = False,
):
    """Multi-turn chat in the terminal; each turn reuses the prompt cache of the earlier ones."""
    if model_name and model:
        fail("give the model once, as MODEL or --model")
    request = options.request_from_flags(max_tokens, temp, top_p, top_k, min_p, seed, 0 if no_draft else draft_tokens)
    options.check_proposers([proposer])
    pair = options.pair_from_flags(model_name or model, target, drafter, verbose, proposer)
    conversation = Conversation(pair)
    render(pair, [{"role": "user", "content": "hi"}])  # no chat template: fail now, not at turn 1
    options.measure_costs_once(pair)
    kwargs = {"request": request, "proposer": proposer}
    console = Console(highlight=False, soft_wrap=True)
    images = []  # for the next message (/image)
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
        elif command == "/image":
            try:
                images.append(mlx_mtp.prepare_images(pair, [argument.strip()])[0])
                console.print(f"image {argument.strip()} goes with your next message", style="dim", markup=False)
            except ValueError as e:
                console.print(f"error: {e}", style="red", markup=False)
        elif command.startswith("/"):
            console.print(f"unknown command {command}; commands: {commands(pair)}", style="dim", markup=False)
        elif line.strip():
            try:
                stream_reply(conversation, line, console, verbose, images=images, **kwargs)
                images = []
            except ValueError as e:  # e.g. the context is full: the conversation goes on
                console.print(f"error: {e} (/reset starts a new conversation)", style="red", markup=False)
            kwargs["request"] = replace(request, seed=None)  # seed once per session, not every turn
