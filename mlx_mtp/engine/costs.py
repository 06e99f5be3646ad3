"""Choosing the draft length K from measured costs and live acceptance.

On a GPU one target forward over K + 1 tokens costs about what one token costs; on a CPU it
does not (docs/performance.md). With T(n) the measured cost of a target forward over n new
tokens, D one drafter step and a_i the live conditional acceptance of draft position i,
a round of K drafts commits E(K) = 1 + a_1 + a_1 a_2 + ... tokens for T(K + 1) + K D, and
the loop picks the K (0 included: plain decoding) with the most tokens per second.
"""

import json
import logging
import os
import statistics
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import mlx.core as mx

from ..checkpoints.paths import cache_home
from ..decoding.proposers import DraftContext, MTPProposer
from ..decoding.sampling import SamplingParams
from ..models import products
from ..models.cpu import MeasuredLinear

logger = logging.getLogger(__name__)

WINDOW = 32  # recent rounds that inform the acceptance estimate
PRIOR = 4.0  # weight (in rounds) of the prior on each conditional acceptance: a few unlucky
# rounds at the start must not switch drafting off
PROBE_EVERY = 8  # after this many plain rounds, draft once to refresh the estimate
COSTS_FORMAT = "v5"  # in the key of remembered costs: bumped when the forward's costs change
# Prompt chunks are powers of two within these bounds: as large as a chunk may be whose
# forward costs no more than a one-token forward (at a short context; at 8K positions a chunk
# costs about twice that), so a prompt being read at most about triples the step time of the
# rows decoding beside it (docs/serving.md).
PREFILL_STEP_RANGE = (16, 2048)


@dataclass
class Costs:
    target: List[float]  # target[n - 1]: seconds for a forward over n new tokens
    draft_step: float  # seconds for one drafter step
    # seconds for one token through plain mlx-lm's own forward and head, what a plain decoding
    # step costs (on the CPU the verify forward is cheaper, see cpu.py); None: not measured
    plain: Optional[float] = None
    # prompt ids read per step (see PREFILL_STEP_RANGE); None: not measured (rows > 1)
    prefill_step_size: Optional[int] = None


class RoundTimes:
    """Live round times against the costs K was chosen from. Costs are measured once and
    remembered, so one taken at a busy moment (or on another machine state) would pin K
    forever. A live round also pays for sampling and bookkeeping, so it takes a little longer
    than its predicted cost, never much less: costs are the fastest of several runs. When
    the median round of the last WINDOW takes under FAST or over SLOW times its prediction,
    the costs are to be measured again."""

    WINDOW = 64
    FAST = 0.75  # the measurement was slowed by other load
    SLOW = 2.0  # the machine itself got slower (wide: a busy moment must not be pinned)

    def __init__(self):
        self.ratios = deque(maxlen=self.WINDOW)  # measured / predicted seconds

    def disagree(self, seconds: float, predicted: float) -> bool:
        self.ratios.append(seconds / predicted)
        if len(self.ratios) < self.WINDOW:
            return False
        if self.FAST <= statistics.median(self.ratios) <= self.SLOW:
            return False
        self.ratios.clear()
        return True


def fastest_time(fn, repeats: int = 5) -> float:
    """The fastest of a few runs: other load only ever slows a run down, so the minimum is
    the estimate that a busy moment spoils least."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def measure_costs(pair, k_max: int, rows: int = 1, context: int = 128) -> Costs:
    """Time target forwards of `rows` rows over 1..k_max + 1 tokens and one drafter step,
    on a scratch cache holding about `context` positions per row (rows at different
    positions, as in a live batch)."""
    target = pair.target
    cache = target.make_cache(rows)
    mx.eval(target.hidden(mx.broadcast_to(mx.arange(3, 3 + context), (rows, context)), cache))
    for c in cache:
        c.trim_rows(list(range(rows)))

    def forward(n):
        def run():
            tokens = mx.broadcast_to(mx.arange(5, 5 + n), (rows, n))
            hidden = target.hidden(tokens, cache)
            ids = mx.argmax(target.logits(hidden), axis=-1)
            if target.pipeline is not None:  # as a round: every rank gets rank 0's ids
                ids = target.pipeline.share(ids.astype(mx.int32), after=hidden)
            mx.eval(ids)
            for c in cache:
                c.trim_rows([n] * rows)

        return run

    costs = [fastest_time(forward(n)) for n in range(1, k_max + 2)]
    plain = None
    if rows == 1 and target.pipeline is None:  # (a pipeline rank holds only some layers)

        def plain_step():
            mx.eval(mx.argmax(target.model(mx.array([[5]]), cache=cache)[:, -1], axis=-1))
            for c in cache:
                c.trim_rows([1])

        plain = fastest_time(plain_step)
    prefill = measure_prefill_step_size(target, cache, costs[0]) if rows == 1 else None
    draft = 0.0
    if pair.drafter is not None:
        positions = cache[0].positions
        position = positions[0] if rows == 1 else mx.array(positions)
        carry = mx.zeros((rows, 1, target.hidden_size), target.dtype)
        history = [[7] * (p + 1) for p in positions]
        ctx = DraftContext(mx.array([7] * rows), carry, position, target.shared_kv(cache), history,
                           [SamplingParams()] * rows)
        drafter = MTPProposer(pair.drafter, target)
        draft = fastest_time(lambda: mx.eval(drafter.propose(ctx, 1).tokens))
    return Costs(costs, draft, plain, prefill)


def measure_prefill_step_size(target, cache, forward: float) -> int:
    """The largest power of two in PREFILL_STEP_RANGE whose prompt chunk, read after the
    scratch cache's positions, costs at most `forward` seconds (one one-token forward)."""

    def read(n):
        def run():
            mx.eval(target.hidden(mx.arange(5, 5 + n)[None], cache))
            for c in cache:
                c.trim_rows([n])

        return run

    low, high = PREFILL_STEP_RANGE
    size = low
    while size < high:
        fits = fastest_time(read(2 * size), repeats=2) <= forward
        if target.pipeline is not None:  # every rank measures as rank 0 decides
            fits = bool(target.pipeline.agree([fits])[0])
        if not fits:
            break
        size *= 2
    return size


def shape_key(pair, k_max: int, rows: int = 1) -> str:
    """Costs depend on shapes, dtype and device, not on weights: the key of a measurement."""
    t, d = pair.target, pair.drafter
    parts = [COSTS_FORMAT, products.machine_key(), t.model_type, t.hidden_size, len(t.layer_types), t.vocab_size,
             t.dtype, mx.default_device(), k_max]
    if d is not None:
        parts += [d.text_args.hidden_size, d.text_args.num_hidden_layers, d.args.use_ordered_embeddings]
    if rows > 1:
        parts.append(f"B{rows}")
    if t.pipeline is not None:  # a forward through the ranks' pipeline
        parts.append("ranks" + ",".join(f"{a}-{b}" for a, b in t.pipeline.ranges))
    return "/".join(map(str, parts))


def remembered() -> dict:
    """What costs.json remembers: {} if it is missing, or unreadable (a crash mid-write by an
    older build, an edit): measured again then, never an error."""
    path = cache_home() / "costs.json"
    try:
        known = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("%s is unreadable (%s): measuring again", path, e)
        return {}
    return known if isinstance(known, dict) else {}


def remember(key: str, value):
    """Add one entry to costs.json, replacing the file at once (two processes measuring on
    a first use must not leave half a file)."""
    path = cache_home() / "costs.json"
    known = remembered()
    known[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(known, indent=1))
    os.replace(scratch, path)


def product_weights(target) -> Dict[tuple, mx.array]:
    """One weight per shape of what the target's CPU forward multiplies: its linear layers
    and its head."""
    weights = {}
    for _, module in target.decoder.named_modules():
        if isinstance(module, MeasuredLinear):
            weights.setdefault(tuple(module.weight.shape), module.weight)
    if target.cpu_head:
        weights.setdefault(tuple(target.head.weight.shape), target.head.weight)
    return weights


def choose_products(pair):
    """Make the target's CPU forward use the fastest product for each of its weight shapes
    and row counts: remembered with the costs for this machine (CPU, BLAS, MLX version) and
    these shapes, else measured now (a few seconds for a big head) and remembered. A
    measurement that fails leaves the default (products.DEFAULT). On Metal, and on the
    ranks of a pipeline (each would measure its own layers into one file), nothing is
    chosen."""
    target = pair.target
    if not target.cpu_kernels or target.pipeline is not None:
        return
    weights = product_weights(target)
    shapes = sorted(weights)
    key = "/".join(["products", COSTS_FORMAT, products.machine_key(), str(target.dtype)]
                   + [f"{o}x{i}" for o, i in shapes])
    known = remembered().get(key)
    if known is not None:
        try:  # (remembered by a build that measured other row counts, or damaged: measured again)
            return products.use({tuple(map(int, shape.split("x"))): ways for shape, ways in known.items()})
        except (ValueError, TypeError, AttributeError):
            pass
    try:
        chosen = products.measure(weights)
    except Exception as e:  # (e.g. out of memory for a big head) the default, remembered: not retried each run
        logger.warning("could not measure which matrix products are fastest here (%s): using %s", e, products.DEFAULT)
        chosen = {shape: [products.DEFAULT] * len(products.ROW_COUNTS) for shape in shapes}
    remember(key, {f"{o}x{i}": ways for (o, i), ways in chosen.items()})
    products.use(chosen)


def costs_known(pair, rows: int = 1) -> bool:
    """Whether this machine has measured the pair's costs for `rows` rows before."""
    return shape_key(pair, pair.default_draft_tokens, rows) in remembered()


def load_or_measure(pair, k_max: int, rows: int = 1, refresh: bool = False) -> Costs:
    """Measured costs, remembered on disk: the same machine and shapes give the same K
    choices, so seeded sampling repeats across runs. `refresh` measures again (the bench
    does, so a measurement spoiled by a busy moment does not stick)."""
    key = shape_key(pair, k_max, rows)
    try:
        known = Costs(**remembered()[key])
    except (KeyError, TypeError):  # (never measured, or a damaged entry: measured again)
        known = None
    measure = refresh or known is None
    pipeline = pair.target.pipeline
    if pipeline is not None:  # rank 0 decides, and every rank takes part in a measurement
        measure = bool(pipeline.agree([measure])[0])
    if measure:
        costs = measure_costs(pair, k_max, rows)
    else:  # (a pipeline rank without rank 0's file takes rank 0's values just below)
        costs = known or Costs([0.0] * (k_max + 1), 0.0)
    if pipeline is not None:  # every rank chooses K and reads prompts as rank 0 does
        values = pipeline.agree(costs.target + [costs.draft_step, costs.prefill_step_size or 0])
        costs = Costs(values[:-2], values[-2], None, int(values[-1]) or None)
    if measure and (pipeline is None or pipeline.last):
        remember(key, asdict(costs))
    return costs


class CostModel:
    """What rounds cost on this machine for one loaded pair, for choosing K: measured costs
    per row count (remembered on disk), and live round times that mark them stale. Costs
    describe the machine and the shapes, not a generation, so every engine on a pair shares
    its one model (`CostModel.of`); only an engine reads or updates it."""

    _by_pair = weakref.WeakKeyDictionary()

    def __init__(self, pair):
        # A weak proxy: `_by_pair` keys on the pair, and a strong reference from its value
        # would keep the pair (and its weights) alive for as long as the process runs.
        self.pair = weakref.proxy(pair)
        self.measured: Dict[int, Costs] = {}  # rows (a power of two) -> Costs
        self.stale: set = set()  # row counts to measure again
        self.round_times = RoundTimes()
        self._prefill_step_size: Optional[int] = None

    @classmethod
    def of(cls, pair) -> "CostModel":
        if pair not in cls._by_pair:
            choose_products(pair)  # costs are of the forward with the products it runs
            cls._by_pair[pair] = cls(pair)
        return cls._by_pair[pair]

    def for_rows(self, rows: int = 1) -> Costs:
        """Costs of target forwards over `rows` rows and of drafter steps: measured once
        per pair at powers of two, interpolated between them."""

        def measured(b: int) -> Costs:
            if b not in self.measured:
                self.measured[b] = load_or_measure(self.pair, self.pair.default_draft_tokens, b, b in self.stale)
                self.stale.discard(b)
            return self.measured[b]

        return interpolate_costs(measured, rows)

    def prefill_step_size(self) -> int:
        """Prompt ids an engine reads per step, from the one-row costs: fixed for the life
        of this model (measuring again must not move where prompts are cut: that would
        change the output of a long prompt)."""
        if self._prefill_step_size is None:
            self._prefill_step_size = self.for_rows(1).prefill_step_size or PREFILL_STEP_RANGE[1]
        return self._prefill_step_size

    def observe_round(self, costs: Costs, k: int, drafter: bool, seconds: float):
        """A round whose K was chosen from `costs` drafted k tokens (with drafter steps or
        not) and took `seconds`: when recent rounds disagree with the costs, they are marked
        to be measured again by `remeasure_stale`."""
        if k >= len(costs.target) or self.pair.target.pipeline is not None:
            # (a row's fixed K past what was measured; or a pipeline: ranks would have to
            # agree on each round's time, one more exchange per round)
            return
        if self.round_times.disagree(seconds, costs.target[k] + drafter * k * costs.draft_step):
            self.stale |= set(self.measured)

    def remeasure_stale(self):
        """Measure again the costs that live rounds disagreed with. A measurement takes a
        few dozen forwards, so the engine calls this only when no row of it is streaming
        (before first tokens), never between two tokens of a stream; until then the old
        costs serve."""
        for b in sorted(self.stale):
            self.measured.pop(b, None)
            self.for_rows(b)


def interpolate_costs(measured, rows: int) -> Costs:
    """Costs for `rows` rows, linear between the powers of two around it: `measured(b)`
    gives (and remembers) a measurement for b rows, so a batch that shrinks row by row
    costs log2(B) measurements, not B."""
    low = 1 << (rows.bit_length() - 1)
    if low == rows:
        return measured(rows)
    a, b = measured(low), measured(2 * low)
    w = (rows - low) / low
    target = [x + w * (y - x) for x, y in zip(a.target, b.target)]
    return Costs(target, a.draft_step + w * (b.draft_step - a.draft_step))


def speedup_bound(costs: Costs, stats) -> Optional[float]:
    """The speedup over plain mlx-lm that these rounds allow at these costs, with nothing
    else spent: tokens committed, at P (plain mlx-lm's step, T(1) if not measured) each, over
    what the rounds cost (T(k + 1) + k D for a drafter round of k drafts, T(k + 1) for a
    lookup round). For a fixed K and the drafter alone that is tau P / (T(K + 1) + K D), tau
    the mean accepted length. None if a round drafted more than the costs cover."""
    spent = 0.0
    for drafts, source in zip(stats.drafts, stats.sources):
        k = len(drafts)
        if k >= len(costs.target):
            return None
        spent += costs.target[k] + (k * costs.draft_step if source == "mtp" else 0.0)
    plain = costs.plain or costs.target[0]
    return sum(stats.committed) * plain / spent if spent else None


def conditional_acceptance(drafts: List[List[int]], accepted: List[int], k_max: int) -> List[float]:
    """a_i = P(draft i accepted | drafts before it accepted), over the recent rounds.

    Each a_i is shrunk towards a prior mean: 1/2 for the first draft, and a_{i-1} for a
    later one, so a position never drafted yet is expected to do as well as the one before
    it. With a flat 1/2 there, a source accepted at 0.9 never tried one draft more (0.5 made
    it look worse than stopping), and never learned that it pays."""
    drafts, accepted = drafts[-WINDOW:], accepted[-WINDOW:]
    out, mean = [], 0.5
    for i in range(k_max):
        reached = [a for d, a in zip(drafts, accepted) if len(d) > i and a >= i]
        hits = sum(a > i for a in reached)
        mean = (hits + PRIOR * mean) / (len(reached) + PRIOR)
        out.append(mean)
    return out


def best_k(costs: Costs, acceptance: List[List[float]], mtp_share: float = 1.0) -> int:
    """argmax over K of expected committed tokens per second, for rows with these
    conditional acceptance profiles verified together (costs for that many rows)."""
    best, best_rate = 0, len(acceptance) / costs.target[0]
    expected, survive = [1.0] * len(acceptance), [1.0] * len(acceptance)
    for k in range(1, min(len(costs.target), 1 + max(map(len, acceptance), default=0))):
        for r, a in enumerate(acceptance):
            if k <= len(a):
                survive[r] *= a[k - 1]
                expected[r] += survive[r]
        rate = sum(expected) / (costs.target[k] + k * costs.draft_step * mtp_share)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


def choose_k(costs: Costs, stats: list, sources: List[str], k_max: int) -> int:
    """K for the next round of rows verified together (costs measured for that many rows),
    each with its generation's `Stats` and the source about to propose for it. Each row is
    judged on its own source's rounds: n-gram rounds and drafter rounds accept at very
    different rates, and only drafter rounds pay for drafter steps."""
    profiles = []
    for s, source in zip(stats, sources):
        if source == "none":
            continue  # nothing to draft for this row
        recent = s.drafts[-PROBE_EVERY:]
        if len(recent) == PROBE_EVERY and not any(recent):
            return 1  # plain rounds teach nothing about acceptance: probe once
        own = [(d, a) for d, a, src in zip(s.drafts, s.accepted, s.sources) if src == source]
        profiles.append(conditional_acceptance([d for d, _ in own], [a for _, a in own], k_max))
    if not profiles:
        return 0
    return best_k(costs, profiles, float("mtp" in sources))
