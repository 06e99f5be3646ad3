"""On Linux, let MLX's CPU matmuls use MKL when the PyPI `mkl` package is installed.

The `mlx[cpu]` Linux wheel links the reference (netlib) BLAS: fp32 matmuls run several
times slower than they could. Loading MKL's single dynamic library into the global symbol
scope BEFORE mlx is imported makes the dynamic linker bind MLX's BLAS and LAPACK symbols
(cblas_sgemm, ...) to MKL instead. Once mlx is imported it is too late: some of its symbols
are bound already, and mixing the two libraries would make results depend on call order.
macOS wheels use Accelerate: never touched. MLX_MTP_NO_MKL=1 turns this off.

This module must not import mlx.
"""

import ctypes
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

DISABLE_ENV = "MLX_MTP_NO_MKL"

loaded: Optional[str] = None  # path of the MKL library MLX uses, if any
reason: str = "not tried"  # why MKL is not in use, for --verbose


def find_mkl() -> Optional[Path]:
    """libmkl_rt from the installed `mkl` distribution (it installs into <prefix>/lib)."""
    try:
        paths = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    for path in paths:
        if path.name.startswith("libmkl_rt.so"):
            return Path(path.locate()).resolve()
    return None


def preload_mkl() -> Optional[str]:
    """Load MKL for MLX if possible; the path loaded, or None (see `reason`)."""
    global loaded, reason
    if loaded:
        return loaded
    path = None
    if not sys.platform.startswith("linux"):
        reason = f"not on Linux ({sys.platform})"
    elif os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        reason = f"disabled by {DISABLE_ENV}"
    elif "mlx.core" in sys.modules:
        reason = "mlx was imported before mlx_mtp"
    else:
        path = find_mkl()
        reason = "the mkl package is not installed (pip install mkl)" if path is None else ""
    if path is None:
        return None
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:  # e.g. its OpenMP runtime is missing: keep the reference BLAS
        reason = f"cannot load {path.name}: {e}"
        return None
    loaded = str(path)
    return loaded


def describe() -> str:
    """One line for --verbose."""
    return f"BLAS: MKL ({loaded})" if loaded else f"BLAS: the mlx wheel's own ({reason})"
