"""`mlx-mtp serve`: the OpenAI-compatible server (mlx_mtp/serve/) on a loaded pair."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..models.cache import MAX_DRAFT_TOKENS
from ..serve.protocol import MAX_TOKENS_CAP
from . import app, fail, one_line_errors
from .display import status
from .options import DrafterOption, ModelOption, TargetOption, VerboseOption, measure_costs_once, pair_from_flags


@app.command()
@one_line_errors
def serve(
    model: ModelOption = None,
    target: TargetOption = None,
    drafter: DrafterOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    # --port and --max-batch are checked below: their messages (and exit code 1) are part of the interface.
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Requests decoded together.")] = 8,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests waiting for a row; past it: HTTP 429.")
    ] = 32,
    draft_tokens: Annotated[
        str, typer.Option("--draft-tokens", help="Tokens drafted per round: auto (chosen each round) or K.")
    ] = "auto",
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY'.")] = None,
    cache_mb: Annotated[int, typer.Option("--cache-mb", min=0, help="Memory for kept conversations (MB).")] = 1024,
    prefill_step_size: Annotated[
        Optional[int],
        typer.Option("--prefill-step-size", min=1,
                     help="Prompt ids read per step beside the decoding rows. Default: measured on this machine."),
    ] = None,
    max_tokens_cap: Annotated[
        Optional[int],
        typer.Option("--max-tokens-cap", min=1,
                     help=f"Most tokens of one reply; requests asking more end there. Default: {MAX_TOKENS_CAP} "
                          "or the context, the smaller."),
    ] = None,
    image_dir: Annotated[
        Optional[Path],
        typer.Option("--image-dir", help="image_url parts may name image files under this directory."),
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="image_url parts may be http(s) URLs the server fetches.")
    ] = False,
    verbose: VerboseOption = False,
):
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from ..serve.app import serve as run_server
    from ..serve.protocol import Settings

    k = None if draft_tokens == "auto" else int(draft_tokens) if draft_tokens.isdigit() else -1
    if k is not None and not 0 <= k <= MAX_DRAFT_TOKENS:
        fail(f"--draft-tokens must be auto or in 0..{MAX_DRAFT_TOKENS}, got {draft_tokens!r}")
    if max_batch < 1 or not 0 < port < 65536:
        fail("--max-batch must be >= 1 and --port in 1..65535")
    if image_dir is not None and not image_dir.is_dir():
        fail(f"--image-dir {image_dir}: no such directory")
    pair = pair_from_flags(model, target, drafter, verbose)
    measure_costs_once(pair)  # (not at the first request)
    name = pair.name or target
    vision = pair.target.vision
    if vision is not None:
        # The tower (and mlx-vlm) now, on this thread, not in the thread that parses the first image.
        try:
            vision.tower(pair.target.hidden_size, pair.target.dtype)
            status(f"images: on (up to {vision.soft_tokens} soft tokens each)")
        except ValueError as e:
            status(f"images: off ({e})")
    ready = lambda: status(f"serving {name} at http://{host}:{port}/v1 (max batch {max_batch}); Ctrl-C stops")
    settings = Settings(max_batch, max_queue, k, cache_mb * 1024 * 1024, prefill_step_size, max_tokens_cap, api_key,
                        None if image_dir is None else str(image_dir), allow_remote_images)
    try:
        run_server(pair, name, host, port, settings, on_ready=ready)
    except KeyboardInterrupt:
        status("stopped")
