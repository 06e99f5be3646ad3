"""Where mlx-mtp keeps its files: $MLX_MTP_HOME, else ~/.cache/mlx-mtp."""

import os
from pathlib import Path


def cache_home() -> Path:
    return Path(os.environ.get("MLX_MTP_HOME") or Path.home() / ".cache" / "mlx-mtp").expanduser()
