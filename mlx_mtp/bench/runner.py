"""Plain mlx-lm against mlx-mtp on the same loaded target: interleaved runs, checked.

Each measured run generates the same prompt twice, once with mlx-lm's `stream_generate` on
`pair.target.model` and once with mlx-mtp, in alternating order so that drift (heat, other
load) hits both. Batched runs do the same with B prompts and each library's
`batch_generate`. Tokens/s is generation tokens over generation time as both libraries
report it (prompt processing excluded). Greedy runs must give the same token ids.
bench/report.py sums the runs up.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import mlx.core as mx
from mlx_lm import batch_generate as mlx_lm_batch_generate
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler

from ..api import batch_generate, generate
from ..checkpoints.pair import Pair
from ..conversation import apply_template
from ..engine.costs import CostModel, load_or_measure
from ..engine.stats import Stats
from ..request import encode

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROMPTS = Path(__file__).with_name("prompts.toml")
WARMUP_TOKENS = 16


def load_prompts(path: Optional[Path] = None) -> Dict[str, List[str]]:
    """The built-in prompts by kind, or a file's non-empty lines as the kind "file"."""
    if path is None:
        return tomllib.loads(PROMPTS.read_text())
    prompts = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return {"file": prompts}


def encode_prompt(pair: Pair, text: str, template: bool) -> List[int]:
    """One user turn through the chat template, or the text itself to be continued."""
    if template:
        text = apply_template(pair, [{"role": "user", "content": text}])
    return encode(pair.tokenizer, text)


@dataclass(frozen=True)
class Setting:
    kind: str
    temperature: float
    draft_tokens: Optional[int]  # None: chosen each round
    batch: Optional[int] = None  # B: B prompts at once with both libraries' batch_generate
    proposer: str = "hybrid"

    @property
    def k_label(self):
        return "auto" if self.draft_tokens is None else self.draft_tokens


@dataclass
class Task:
    setting: Setting
    prompt: int  # index of its (first) prompt within its kind
    prompts: List[List[int]]  # one prompt, or B for a batch
    repeat: int


def plan(
    pair: Pair,
    prompts: Dict[str, List[str]],
    temperatures,
    draft_tokens,
    repeats: int,
    batches=(),
    proposers=("hybrid",),
    template: bool = True,
) -> List[Task]:
    """Every run to measure, setting by setting.

    Without batches: kind x temperature x draft length x proposer, each prompt alone. With
    batches: batch size x temperature x draft length x proposer, each batch the first B
    prompts of all kinds (cycled when there are fewer). `template`: prompts go through the
    chat template as a user turn; otherwise they are continued as plain text.
    """
    encoded = {kind: [encode_prompt(pair, p, template) for p in texts] for kind, texts in prompts.items()}
    if batches:
        pool = [p for rows in encoded.values() for p in rows]
        return [
            Task(Setting("mixed", t, k, b, name), 0, [pool[i % len(pool)] for i in range(b)], r)
            for b in batches
            for t in temperatures
            for k in draft_tokens
            for name in proposers
            for r in range(repeats)
        ]
    return [
        Task(Setting(kind, t, k, None, name), i, [tokens], r)
        for kind, rows in encoded.items()
        for t in temperatures
        for k in draft_tokens
        for name in proposers
        for i, tokens in enumerate(rows)
        for r in range(repeats)
    ]


@dataclass
class Run:
    task: Task
    seed: int
    baseline_tokens: List[List[int]]  # per prompt
    baseline_tps: float
    mtp_tokens: List[List[int]]
    mtp_tps: float  # of the batch as a whole when batched
    stats: Stats  # of all rows
    row_stats: List[Stats]  # per row
    draft_tokens_chosen: List[int]  # per round: K, the most drafts of a row

    @property
    def identical(self) -> Optional[bool]:
        """Greedy: both produced the same ids. None when sampling (outputs differ by design)."""
        if self.task.setting.temperature > 0:
            return None
        return self.baseline_tokens == self.mtp_tokens

    def to_dict(self) -> dict:
        s = self.task.setting
        return {
            "kind": s.kind,
            "batch": s.batch,
            "temperature": s.temperature,
            "draft_tokens": s.k_label,
            "proposer": s.proposer,
            "prompt": self.task.prompt,
            "repeat": self.task.repeat,
            "seed": self.seed,
            "prompt_tokens": [len(p) for p in self.task.prompts],
            "baseline": {"generation_tokens": sum(map(len, self.baseline_tokens)), "generation_tps": self.baseline_tps},
            "mtp": {**self.stats.to_dict(), "generation_tps": self.mtp_tps},
            "row_acceptance": [r.acceptance_rate for r in self.row_stats],
            "draft_tokens_chosen": self.draft_tokens_chosen,
            "identical": self.identical,
        }


def run_baseline(pair: Pair, task: Task, max_tokens: int, sampling: dict, seed: int):
    """Plain mlx-lm on the same model object: (ids per prompt, generation tokens/s)."""
    sampler = make_sampler(
        sampling["temperature"], top_p=sampling["top_p"], min_p=sampling["min_p"], top_k=sampling["top_k"]
    )
    mx.random.seed(seed)
    model, tokenizer = pair.target.model, pair.tokenizer
    if task.setting.batch:
        out = mlx_lm_batch_generate(
            model, tokenizer, task.prompts, max_tokens=max_tokens, sampler=sampler, return_token_ids=True
        )
        return out.token_ids, out.stats.generation_tps
    tokens = []
    for response in mlx_lm_stream_generate(model, tokenizer, task.prompts[0], max_tokens, sampler=sampler):
        tokens.append(response.token)  # the last one is the EOS when it stopped there, as in mlx-mtp
    return [tokens], response.generation_tps


def run_mtp(pair: Pair, task: Task, max_tokens: int, sampling: dict, seed: int):
    """mlx-mtp: (ids per prompt, generation tokens/s, stats of all rows, per row, K per round)."""
    kwargs = dict(max_tokens=max_tokens, num_draft_tokens=task.setting.draft_tokens, seed=seed,
                  proposer=task.setting.proposer, **sampling)
    if task.setting.batch:
        out = batch_generate(pair, task.prompts, **kwargs)
        # mlx-lm's batch_generate leaves out the EOS that ended a row.
        rows = [r.tokens[:-1] if r.finish_reason == "stop" else r.tokens for r in out]
        stats = [r.stats for r in out]
        return rows, out.stats.generation_tps, Stats.pooled(stats), stats, out.stats.draft_tokens
    out = generate(pair, task.prompts[0], **kwargs)
    return [out.tokens], out.stats.generation_tps, out.stats, [out.stats], [len(d) for d in out.stats.drafts]


def benchmark(
    pair: Pair,
    tasks: List[Task],
    max_tokens: int = 128,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int = 0,
) -> Iterator[Run]:
    """Warm both paths up, then measure each task; yields runs as they finish."""
    warm = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    first = {}  # one task per batch size and draft length: each compiles its own shapes
    for task in tasks:
        first.setdefault((task.setting.batch, task.setting.draft_tokens), task)
    # Costs measured afresh before anything is timed: T(1..K + 1) and D for each setting's
    # bound, and for auto K every batch size a batch passes through as its rows finish.
    k_max = max([pair.default_draft_tokens] + [task.setting.draft_tokens or 0 for task in tasks])
    most = 1
    if any(task.setting.draft_tokens is None for task in tasks):
        most = max(task.setting.batch or 1 for task in tasks)
    sizes = [1 << i for i in range((2 * most - 1).bit_length())]  # the powers of two up to `most` and past it
    model = CostModel.of(pair)  # (first: it chooses the products that the costs are of)
    model.measured = {b: load_or_measure(pair, k_max, b, refresh=True) for b in sizes}
    for task in first.values():
        run_baseline(pair, task, WARMUP_TOKENS, warm, seed)
        run_mtp(pair, task, WARMUP_TOKENS, warm, seed)
    for i, task in enumerate(tasks):
        sampling = {"temperature": task.setting.temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
        args = (pair, task, max_tokens, sampling, seed + i)
        if task.repeat % 2 == 0:
            baseline = run_baseline(*args)
            mtp = run_mtp(*args)
        else:
            mtp = run_mtp(*args)
            baseline = run_baseline(*args)
        yield Run(task, seed + i, *baseline, *mtp)
