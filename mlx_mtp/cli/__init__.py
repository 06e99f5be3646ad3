"""The `mlx-mtp` command: chat, generate, serve, bench and models, a thin layer over the library.

Every bad input ends in one line on stderr and a non-zero exit; `--verbose` shows the
traceback instead. Flags follow mlx-lm's where it has them.
"""

import functools
import os
import sys

import transformers
import typer
import typer.core
# typer >= 0.29 vendors click: the usage errors it raises are this class, not `click`'s.
from typer._click.exceptions import UsageError

from ..models import pipeline

# Under `mlx.launch`, every rank runs the command and rank 0 alone talks to the user; the
# others only report their own errors, named by rank.
RANK = int(os.environ["MLX_RANK"]) if os.environ.get("MLX_RANK", "").isdigit() else 0


def fail(message: str, code: int = 1):
    typer.echo(f"{f'rank {RANK}: ' if RANK else ''}error: {message}", err=True)
    sys.exit(code)


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a missing argument, a flag of the wrong type) as one line too."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as e:
            fail(e.format_message(), e.exit_code)
        # Without standalone mode, typer returns the code of a `typer.Exit` (e.g. 130 on Ctrl-C).
        sys.exit(code if isinstance(code, int) else 0)


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


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Exact speculative decoding on MLX with multi-token-prediction drafters.",
)


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context):
    # transformers' own warnings (e.g. a prompt longer than the tokenizer's maximum) would
    # break one-line errors; the library reports those conditions itself.
    transformers.logging.set_verbosity_error()
    if RANK:
        sys.stdout = open(os.devnull, "w")
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def main():
    app()


# Each command module registers its command on `app` (so they come after it), in help order.
from . import generate, chat, bench, serve, models  # noqa: E402, F401
