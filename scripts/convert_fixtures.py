#!/usr/bin/env python
"""Convert the committed fixtures with the real MLX converters, as Mac users make their checkpoints.

Run with a venv that has both converters (mlx-vlm does not install mlx-lm; on Linux add
`mlx[cpu]`):

    python3 -m venv /tmp/vlm-venv && /tmp/vlm-venv/bin/pip install mlx-vlm mlx-lm==0.32.2
    /tmp/vlm-venv/bin/python scripts/convert_fixtures.py

Deterministic and idempotent: tests/fixtures/converted/ is deleted and rewritten; nothing else
is touched. It writes (affine quantization, group size 32: see GROUP_SIZE), each with the
tokenizer files the converter saved:

    vlm_4bit/ vlm_8bit/ vlm_mixed/  mlx_vlm.convert of target_mm (gemma4; the vision tower and
                                    embed_vision stay float32, as mlx-vlm leaves them)
    lm_4bit/  lm_8bit/  lm_mixed/   mlx_lm.convert of target_31b (gemma4_text)
    drafter_vlm_4bit/ drafter_vlm_8bit/
                                    mlx_vlm.convert of drafter_dense (gemma4_assistant)
    conversions.json                every conversion tried: converter, source, settings, fixes,
                                    and "ok" or the converter's error verbatim

Mixed is the converters' "mixed_4_6" recipe. mlx-lm has no gemma4_assistant model, so only
mlx-vlm writes a drafter ("ValueError: Model type gemma4_assistant not supported.").

Fixes, made to a temporary copy of a fixture (the committed files are never changed):
- `global_head_dim`: transformers 5.20 writes the full-attention head size only under
  `per_layer_config`, while mlx-lm's gemma4_text and mlx-vlm's gemma4 text config read a
  top-level `global_head_dim` (default 512). As written, both converters fail with
  "ValueError: Expected shape (1024, 64) but received shape (64, 64) for parameter
  [language_model.]model.layers.2.self_attn.q_proj.weight". The copy's text config is the
  one mlx_mtp.checkpoints.loading.normalize_gemma4_text makes (the key derived from `per_layer_config`,
  transformers' defaults written out); published Gemma 4 configs carry `global_head_dim` at
  the top level, so the outputs look like conversions of those.
- Drafter tokenizer: mlx_vlm.convert loads a processor, and drafter_dense has no tokenizer
  ("ValueError: Unrecognized processing class in <drafter_dense>. Can't instantiate a
  processor, ..."), so its copy gets target_31b's (the same vocabulary).
No processor files are needed for target_mm: mlx-vlm builds its own Gemma4Processor from the
tokenizer with default settings and saves it (processor_config.json). That processor adds
"<|video|>" to the tokenizer as id 512, outside the fixtures' vocabulary of 512.
"""

import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # mlx_mtp itself need not be installed in the converters' venv
from mlx_mtp.checkpoints.loading import normalize_gemma4_text  # noqa: E402
FIXTURES = REPO / "tests" / "fixtures"
OUT = FIXTURES / "converted"

# The fixtures' linear layers have input sizes 32 (sliding-layer o_proj: 2 heads x 16), 64 and
# 128. The converters skip (leave in float) any layer whose input size the group size does not
# divide, so the default 64 would leave the sliding o_proj layers unquantized; 32 quantizes
# every linear layer and the embedding, as 64 does in a real checkpoint. mlx-vlm's mixed
# recipes use 64 whatever is passed, so vlm_mixed keeps the sliding o_proj layers in float.
GROUP_SIZE = 32
RECIPES = {
    "4bit": {"q_bits": 4},
    "8bit": {"q_bits": 8},
    "mixed": {"q_bits": 4, "quant_predicate": "mixed_4_6"},  # 6 bits: some v_proj/down_proj (+ mlx-vlm's embedding)
}


def add_global_keys(src: Path):
    """The text config as mlx_mtp reads it: `global_head_dim` and the rest at the top level."""
    config = json.loads((src / "config.json").read_text())
    if "text_config" in config:
        config["text_config"] = normalize_gemma4_text(config["text_config"])
    else:
        config = normalize_gemma4_text(config)
    (src / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def add_target_tokenizer(src: Path):
    # mlx_vlm.convert loads (and saves) a processor; the fixture drafter has no tokenizer
    # files, and its vocabulary is target_31b's.
    for f in (FIXTURES / "target_31b").glob("*token*"):
        shutil.copy(f, src)


FIXES = {"global_head_dim from per_layer_config": add_global_keys, "tokenizer of target_31b": add_target_tokenizer}
KEYS, TOKENIZER = FIXES

# (output dir, converter, fixture, recipe, fixes made to a temporary copy of the fixture)
CONVERSIONS = [
    ("as_written_vlm", "vlm", "target_mm", "4bit", []),  # fails: why the fix is needed
    ("as_written_lm", "lm", "target_31b", "4bit", []),
    *[(f"vlm_{recipe}", "vlm", "target_mm", recipe, [KEYS]) for recipe in RECIPES],
    *[(f"lm_{recipe}", "lm", "target_31b", recipe, [KEYS]) for recipe in RECIPES],
    ("drafter_vlm_as_fixture", "vlm", "drafter_dense", "4bit", [KEYS]),  # fails: no tokenizer
    ("drafter_vlm_4bit", "vlm", "drafter_dense", "4bit", [KEYS, TOKENIZER]),
    ("drafter_vlm_8bit", "vlm", "drafter_dense", "8bit", [KEYS, TOKENIZER]),
    ("drafter_lm_4bit", "lm", "drafter_dense", "4bit", [KEYS, TOKENIZER]),
]


def convert_vlm(src: Path, dst: Path, **recipe):
    from mlx_vlm.convert import convert

    convert(str(src), str(dst), quantize=True, q_group_size=GROUP_SIZE, **recipe)


def convert_lm(src: Path, dst: Path, **recipe):
    from mlx_lm import convert

    convert(str(src), str(dst), quantize=True, q_group_size=GROUP_SIZE, **recipe)


CONVERTERS = {"vlm": convert_vlm, "lm": convert_lm}


def attempt(tmp: Path, out: str, converter: str, fixture: str, recipe: str, fixes: list) -> dict:
    """Run one conversion into OUT/out: "ok", or the converter's error (its output removed)."""
    source = FIXTURES / fixture
    if fixes:
        source = shutil.copytree(source, tmp / out)
        for fix in fixes:
            FIXES[fix](source)
    entry = {"output": out, "converter": f"mlx_{converter}.convert", "source": f"tests/fixtures/{fixture}",
             "q_group_size": GROUP_SIZE, **RECIPES[recipe], "fixes": fixes}
    try:
        CONVERTERS[converter](source, OUT / out, **RECIPES[recipe])
        entry["result"] = "ok"
    except Exception as e:  # recorded, not raised: a converter refusing is a finding
        traceback.print_exc()
        # Name the fixture, not the temporary copy, whose path changes every run.
        entry["result"] = f"{type(e).__name__}: {e}".replace(str(source), f"<{fixture}>")
        shutil.rmtree(OUT / out, ignore_errors=True)
    print(f"[convert_fixtures] {out}: {entry['result']}")
    return entry


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        log = [attempt(Path(tmp), *conversion) for conversion in CONVERSIONS]
    (OUT / "conversions.json").write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
