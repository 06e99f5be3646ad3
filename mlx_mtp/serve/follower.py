"""The ranks other than 0 of a pipeline-sharded server. Before each step, rank 0 sends them
what it did to its engine and its kept conversations since the last one (a plan of ops, as
JSON through `Pipeline.share_json`); they do the same to theirs, then step with it. Jobs and
kept conversations are named by rank 0's `id()` of them."""

from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

from ..checkpoints.pair import Pair
from ..engine.rows import PromptCache
from ..engine.scheduler import Engine
from .protocol import Settings, parse_echo, parse_request


class Op:
    """One op of a plan; as JSON, its fields and its class's name."""

    def to_json(self) -> dict:
        return {"op": type(self).__name__, **asdict(self)}

    @staticmethod
    def from_json(data: dict) -> "Op":
        data = dict(data)
        return OPS[data.pop("op")](**data)


@dataclass
class AddRow(Op):
    """Rank 0 admitted job `job`: add its row, continuing kept conversation `taken` (rolled
    back to `taken_tokens` ids) if not None."""

    job: int
    prompt: List[int]  # all of it, also what the kept conversation has
    settings: dict  # the request's body but its prompt: parsed again here
    stops: List[str]  # the request's and the server's stop strings
    taken: Optional[int]
    taken_tokens: int


@dataclass
class FinishRow(Op):
    """Job `job`'s row ended: its conversation is kept as `key` (if any), and kept
    conversations `dropped` go to make room."""

    job: int
    key: Optional[int]  # None: not kept (nothing was read)
    dropped: List[int]


@dataclass
class DropKept(Op):
    """A failed request's conversation was kept again; `dropped` went to make room."""

    dropped: List[int]


OPS = {op.__name__: op for op in (AddRow, FinishRow, DropKept)}


def send_plan(pipeline, ops: List[Op], stop: bool = False):
    """Rank 0's side. An empty plan is sent too (as None, one sync): the others step when it does."""
    pipeline.share_json({"ops": [op.to_json() for op in ops], "stop": stop} if ops or stop else None)


def receive_plan(pipeline) -> Tuple[List[Op], bool]:
    """The other ranks' side: rank 0's ops, and whether it stops."""
    plan = pipeline.share_json() or {"ops": [], "stop": False}
    return [Op.from_json(op) for op in plan["ops"]], plan["stop"]


def follow(pair: Pair, settings: Settings):
    """Do what rank 0 did, step when it steps, until it stops."""
    engine = Engine(pair, max_batch=settings.max_batch, prefill_step_size=settings.prefill_step_size)
    context = pair.target.max_positions
    rows, kept = {}, {}  # rank 0's job -> row; rank 0's key -> kept conversation
    while True:
        ops, stop = receive_plan(pair.target.pipeline)
        for op in ops:
            if isinstance(op, AddRow):
                conv = PromptCache()
                if op.taken is not None:
                    conv = kept.pop(op.taken)
                    conv.rewind(op.taken_tokens)
                # the stop strings come whole in `stops` (the server's own ones too)
                request = parse_request({**op.settings, "stop": None}, context, pair.target.vocab_size,
                                        settings, op.stops, parse_echo(op.settings, chat=False)[0])
                rows[op.job] = engine.add(request.with_prompt(op.prompt[len(conv.tokens):]), conv)
                continue
            if isinstance(op, FinishRow):
                row = rows.pop(op.job)
                engine.remove(row)
                if op.key is not None:
                    kept[op.key] = row.conversation
            for key in op.dropped:
                kept.pop(key, None)
        if stop:
            return
        if engine.busy:
            try:
                engine.step()
            except Exception:  # as on rank 0: the step changed nothing, its rows end (rank 0 says so)
                pass
