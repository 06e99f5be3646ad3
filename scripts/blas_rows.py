"""How fast this machine's BLAS multiplies a weight matrix by a few rows: what a verify of n
tokens costs on the CPU (README, "Fast CPU path", "What limits it now").

    python scripts/blas_rows.py [--rows 1,2,3,4,5,8] [--repeats 7]

Decoding is memory-bound: a product of W [out, in] with n rows ideally reads W once, so its
time should hardly grow with n. For the target's head (262144 x 640 fp32, 671 MB) and for the
18 MLP matrices of the embedded target's layers (2048 x 640 each), it prints the fastest of
`--repeats` runs, and the read speed of W that the time stands for, of:

- `mlx (W @ x.T).T`: the product the verify forward ran everywhere before it measured, with
  MLX's BLAS (MKL when `cpu-fast` is installed, see blas.py);
- `mlx x @ W.T`: mlx-lm's own orientation;
- `mlx chosen`: what the verify forward runs now: the way `products.measure` found fastest
  for this shape and n on this machine (its name in the last column);
- `numpy W @ x.T` and `numpy n gemv`: numpy's BLAS (OpenBLAS in the PyPI wheels) as one
  product, and as one matrix-vector product per row (W read n times).
"""

import argparse

import mlx_mtp  # noqa: F401  (before mlx: loads MKL on Linux)
import mlx.core as mx
import numpy as np

from mlx_mtp.models import blas, products
from mlx_mtp.models.products import product
from mlx_mtp.engine.costs import fastest_time


def candidates(weights, rows):
    """name -> n -> a function that computes every W @ x.T for one x of n rows."""
    xs = {n: np.random.default_rng(n).standard_normal((n, weights[0].shape[1]), dtype=np.float32) for n in rows}
    mx_w, mx_x = [mx.array(w) for w in weights], {n: mx.array(x) for n, x in xs.items()}
    mx.eval(mx_w, mx_x)
    return {
        "mlx (W @ x.T).T": lambda n: lambda: mx.eval([(w @ mx_x[n].T).T for w in mx_w]),
        "mlx x @ W.T": lambda n: lambda: mx.eval([mx_x[n] @ w.T for w in mx_w]),
        "mlx chosen": lambda n: lambda: mx.eval([product(mx_x[n], w) for w in mx_w]),
        "numpy W @ x.T": lambda n: lambda: [w @ xs[n].T for w in weights],
        "numpy n gemv": lambda n: lambda: [[w @ row for row in xs[n]] for w in weights],
    }


MAX_ROWS = 64  # a verify is at most 17 rows; the head's output for n rows is n MB


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def row_counts(text: str):
    """"1,2,3" -> [1, 2, 3], each in 1..MAX_ROWS."""
    counts = [positive(n) for n in text.split(",")]
    if max(counts) > MAX_ROWS:
        raise argparse.ArgumentTypeError(f"row counts go up to {MAX_ROWS}, got {max(counts)}")
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=row_counts, default="1,2,3,4,5,8", help="row counts n, comma-separated")
    parser.add_argument("--repeats", type=positive, default=7, help="runs of each product (the fastest counts)")
    args = parser.parse_args()
    rows, repeats = args.rows, args.repeats
    numpy_blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    print(f"MLX's {blas.describe()}; numpy's BLAS: {numpy_blas['name']} {numpy_blas.get('version', '')}")
    rng = np.random.default_rng(0)
    shapes = {"head 262144 x 640": [(262144, 640)], "18 x MLP 2048 x 640": [(2048, 640)] * 18}
    for label, shape_list in shapes.items():
        weights = [rng.standard_normal(s, dtype=np.float32) for s in shape_list]
        products.use(products.measure({shape_list[0]: mx.array(weights[0])}))
        megabytes = sum(w.nbytes for w in weights) / 1e6
        print(f"\n{label} ({megabytes:.0f} MB): ms (GB/s of W read once)")
        # One product at a time over every n: OpenBLAS's threads spin for a while after a call
        # and would slow down an MLX product timed right after a numpy one.
        times = {name: [fastest_time(make(n), repeats) * 1e3 for n in rows] for name, make in candidates(weights, rows).items()}
        print(f"{'n':>3}" + "".join(f"{name:>22}" for name in times) + "  chosen")
        for i, n in enumerate(rows):
            print(f"{n:>3}" + "".join(f"{t[i]:>13.1f} ({megabytes / t[i]:>4.0f})" for t in times.values())
                  + f"  {products.way_for(shape_list[0], n)}")


if __name__ == "__main__":
    main()
