"""Which kernel computes x @ W.T fastest on this machine, per weight shape and row count.

A BLAS picks its path by the shape of a product, and for a few rows the fastest
orientation differs between CPUs: on an AMD EPYC with MKL, `(W @ x.T).T` read the target's
head once for 2-5 rows where `x @ W.T` re-packed it (3x slower at 3 rows); on an Intel Xeon
with the same MKL the opposite held. So the CPU forward assumes nothing: `measure` times
each way for every weight shape of a pair at the row counts its forwards meet, and the
forward takes the fastest (`product`). Every way computes the same products, summed in
another order: results may differ in the last bit, as with any change of kernel (the
tests check the ids).

The ways:
- "row": x @ W.T, what mlx-lm computes;
- "column": (W @ x.T).T;
- "column2": for one row only, (W @ [x; x].T).T[:1]: a BLAS runs a one-row product (a gemv)
  on one thread, a two-row one on all (the embedded head: 26 ms -> 18 ms on the AMD CPU).
"""

import platform
import subprocess
import time
from bisect import bisect_right
from functools import lru_cache
from typing import Callable, Dict, Iterable, List, Tuple

import mlx.core as mx

from . import blas

# Row counts measured: one token, verifies of K + 1 tokens for 1-8 rows, prompt chunks (a
# count above the last takes the last one's choice: past a few dozen rows a BLAS runs its
# full kernel either way).
ROW_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40)
WAYS = ("row", "column", "column2")
DEFAULT = "column"  # before (or without) a measurement: the way this project used everywhere

Shape = Tuple[int, int]

# weight shape [out, in] -> the fastest way for each of ROW_COUNTS; filled by `use`
_chosen: Dict[Shape, List[str]] = {}


def way_for(shape: Shape, rows: int) -> str:
    """The way chosen for this weight shape and number of rows (the measured row count at
    or below it); DEFAULT for a shape never measured."""
    ways = _chosen.get(tuple(shape))
    if ways is None:
        return DEFAULT
    return ways[max(bisect_right(ROW_COUNTS, rows) - 1, 0)]


def compute(way: str, x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T, [M, in] x [out, in] -> [M, out], computed the given way."""
    if way == "row":
        return x @ weight.T
    if way == "column2" and x.shape[0] == 1:
        # copied, not broadcast: a stride-0 view is as slow as one row
        return (weight @ mx.concatenate([x, x]).T).T[:1]
    return (weight @ x.T).T


def product(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T for [..., in] x [out, in] -> [..., out], the fastest measured way."""
    rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [M, in]
    out = compute(way_for(weight.shape, rows.shape[0]), rows, weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def ways_at(rows: int) -> Iterable[str]:
    return WAYS if rows == 1 else WAYS[:2]


def time_way(way: str, x: mx.array, weight: mx.array, repeats: int = 2) -> float:
    """Seconds for one product computed that way: the fastest of a few runs after a warm-up
    (other load only slows a run down)."""
    best = float("inf")
    for i in range(repeats + 1):
        tic = time.perf_counter()
        mx.eval(compute(way, x, weight))
        if i:
            best = min(best, time.perf_counter() - tic)
    return best


def measure(weights: Dict[Shape, mx.array], timer: Callable = time_way) -> Dict[Shape, List[str]]:
    """For each weight (one per shape), the fastest way at each of ROW_COUNTS, as
    `timer(way, x, weight)` gives the seconds of a product."""
    chosen = {}
    for shape, weight in weights.items():
        ways = []
        for rows in ROW_COUNTS:
            x = mx.random.normal((rows, shape[1]), key=mx.random.key(rows)).astype(weight.dtype)
            mx.eval(x)
            times = {way: timer(way, x, weight) for way in ways_at(rows)}
            ways.append(min(times, key=times.get))
        chosen[shape] = ways
    return chosen


def use(chosen: Dict[Shape, List[str]]):
    """Make `product` take these choices (from `measure`, or remembered)."""
    for shape, ways in chosen.items():
        if len(ways) != len(ROW_COUNTS) or not set(ways) <= set(WAYS):
            raise ValueError(f"a choice of product for {shape} does not fit ROW_COUNTS and WAYS: {ways}")
    _chosen.update({tuple(shape): list(ways) for shape, ways in chosen.items()})


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name, as the OS reports it."""
    try:
        if platform.system() == "Darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What decides which kernel is fastest, besides the shapes: the CPU, the BLAS, MLX."""
    return f"{cpu_model()}|{'mkl' if blas.loaded else 'own blas'}|mlx {mx.__version__}"
