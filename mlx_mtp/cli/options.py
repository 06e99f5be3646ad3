"""The options the commands share, named as in mlx-lm, and the request and pair they name."""

import time
from typing import Annotated, List, Optional

import mlx.core as mx
import typer

import mlx_mtp

from ..checkpoints import registry
from ..checkpoints.pair import Pair
from ..decoding.proposers import PROPOSERS, make_proposer
from ..decoding.sampling import SamplingParams
from ..engine.costs import CostModel, costs_known
from ..models import blas
from ..request import GenerationRequest
from . import fail
from .display import distributed_lines, status

ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="A pair from models.toml (see `mlx-mtp models`). Default: the embedded pair."),
]
TargetOption = Annotated[Optional[str], typer.Option(help="Target: a local directory or a Hugging Face repo id.")]
DrafterOption = Annotated[Optional[str], typer.Option(help="Drafter for --target: a local directory or a repo id.")]
TempOption = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set with this mass.")]
TopKOption = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 keeps all.")]
MinPOption = Annotated[float, typer.Option("--min-p", help="Drop tokens below this fraction of the top probability.")]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
DraftTokensOption = Annotated[
    Optional[int],
    typer.Option("--draft-tokens", help="Tokens drafted per round (K). Default: chosen each round, up to the pair's."),
]
NoDraftOption = Annotated[bool, typer.Option("--no-draft", help="Plain decoding of the target, for comparison.")]
# A string, not an Enum: check_proposers gives generate the message of bench's comma-separated list.
ProposerOption = Annotated[
    str,
    typer.Option(
        "--proposer", help="Who drafts: hybrid (n-gram lookup, else the drafter), mtp (the drafter alone) or ngram."
    ),
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="More statistics; tracebacks on errors.")]


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


def measure_costs_once(pair: Pair):
    """Measure what this pair's forwards cost here (remembered: a first use only), saying
    so: before the first prompt, whose timings must not count it."""
    if pair.target.pipeline is None and not costs_known(pair):
        status("Measuring what forwards of this pair cost on this machine, to choose draft lengths "
               "(first use only, about ten seconds)")
        CostModel.of(pair).for_rows(1)


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
