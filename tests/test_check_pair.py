"""scripts/check_pair.py: the one report a user runs on a real pair, here on a fixture pair."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from conftest import FIXTURES

SCRIPT = Path(__file__).parents[1] / "scripts" / "check_pair.py"


def test_check_pair_reports_identity_acceptance_speed_and_memory(tmp_path):
    out = tmp_path / "check.json"
    target, drafter = FIXTURES / "target_31b", FIXTURES / "drafter_dense"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", str(target), "--drafter", str(drafter), "-n", "8", "--json-out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "greedy identical to mlx-lm: yes (15 prompts)" in result.stdout
    report = json.loads(out.read_text())
    check = report["check"]
    assert check["identical"] is True and check["runs"] == len(report["runs"]) == 15
    assert report["overall_speedup"] > 0 and len(report["costs"]["target"]) == 5
    assert set(check["by_source"]) <= {"mtp", "ngram"} and check["mean_accepted_length"] >= 1
    # Memory: the target's weights are exactly the checkpoint's tensors (fp32 here).
    tensors = mx.load(str(target / "model.safetensors"))
    assert check["target_weight_bytes"] == sum(v.nbytes for v in tensors.values())
    assert 0 < check["drafter_weight_bytes"] < check["target_weight_bytes"]
    assert check["max_rss"] > check["target_weight_bytes"]


def test_check_pair_bad_inputs_fail_in_one_line(tmp_path):
    def check(*args):
        result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        return result.stderr.strip().splitlines()[-1]

    pair = ["--target", FIXTURES / "target_31b", "--drafter", FIXTURES / "drafter_dense"]
    assert "give an alias or --target" in check()
    assert "error: no-such-alias: no such directory" in check("no-such-alias")
    assert "--json-out: no directory" in check(*pair, "--json-out", tmp_path / "nowhere" / "c.json")
    assert "--max-tokens must be >= 1" in check(*pair, "-n", 0)
    assert "does not match target" in check("--target", FIXTURES / "target_31b", "--drafter", FIXTURES / "drafter_bad_hidden")
