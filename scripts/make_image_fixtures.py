#!/usr/bin/env python
"""Reference outputs of tests/fixtures/target_mm on a prompt with two images, from transformers.

Run with the reference stack (torch 2.13.0 CPU + transformers 5.20.2 + Pillow), after
scripts/make_fixtures.py:

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 transformers==5.20.2 pillow
    /tmp/refenv/bin/python scripts/make_image_fixtures.py

Writes tests/fixtures/images/ (deterministic; the directory is rewritten, nothing else is
touched):

    square.png            48 x 48: resized (bicubic) to 96 x 96, 64 soft tokens
    wide.png              40 x 64: resized to 72 x 120, 60 soft tokens
    processor_config.json Gemma4ImageProcessor settings for target_mm (max_soft_tokens 70)
    target_mm_e2b/        Gemma4ForConditionalGeneration with target_e2b's language model
                          (per-layer inputs, KV-shared layers) and target_mm's vision tower
    reference.npz         per variant ("causal": target_mm as written; "vision": the same
                          weights with text_config.use_bidirectional_attention = "vision", as
                          Gemma 4 26B and 31B, whose sliding layers attend both ways within an
                          image; "e2b": target_mm_e2b, where E2B's per-layer inputs read the pad
                          id at soft tokens): the prompt's ids, the logits after its last id,
                          and 24 greedy ids (`generate`)
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "tests" / "fixtures" / "target_mm"
E2B = REPO / "tests" / "fixtures" / "target_e2b"
OUT = REPO / "tests" / "fixtures" / "images"
SOFT_TOKENS = 70  # the smallest budget transformers allows (70, 140, 280, 560, 1120)
MAX_NEW = 24
BOS, BOI, EOI, IMAGE = 2, 6, 7, 8


def picture(height: int, width: int, seed: int) -> Image.Image:
    """Smooth colour gradients plus noise: resizing it changes every pixel a little."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    rgb = rgb + rng.normal(0, 20, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def write_e2b():
    """target_e2b's language model under target_mm's vision tower, saved as transformers saves it."""
    mm = Gemma4ForConditionalGeneration.from_pretrained(str(TARGET)).eval()
    text = Gemma4ForCausalLM.from_pretrained(str(E2B)).eval()
    config = Gemma4Config(text_config=text.config, vision_config=mm.config.vision_config, audio_config=None,
                          **{k: getattr(mm.config, k) for k in ("boi_token_id", "eoi_token_id", "image_token_id",
                                                                "video_token_id", "boa_token_id", "eoa_token_index",
                                                                "audio_token_id", "tie_word_embeddings")},
                          eos_token_id=1, bos_token_id=2, pad_token_id=0)
    model = Gemma4ForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    model.model.vision_tower.load_state_dict(mm.model.vision_tower.state_dict(), strict=True)
    model.model.embed_vision.load_state_dict(mm.model.embed_vision.state_dict(), strict=True)
    model.save_pretrained(str(OUT / "target_mm_e2b"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(E2B / name, OUT / "target_mm_e2b" / name)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    images = {"square": picture(48, 48, 1), "wide": picture(40, 64, 2)}
    for name, image in images.items():
        image.save(OUT / f"{name}.png")
    vision = json.loads((TARGET / "config.json").read_text())["vision_config"]
    settings = dict(patch_size=vision["patch_size"], pooling_kernel_size=vision["pooling_kernel_size"],
                    max_soft_tokens=SOFT_TOKENS)
    (OUT / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_processor_type": "Gemma4ImageProcessor", **settings}}, indent=2) + "\n")

    processor = Gemma4ImageProcessorPil(**settings)
    loaded = [Image.open(OUT / f"{name}.png") for name in images]  # what a user's file gives
    inputs = processor(images=loaded, return_tensors="pt")
    soft = [int(n) for n in inputs["num_soft_tokens_per_image"]]
    text = [list(range(13, 21)), list(range(21, 26)), list(range(26, 31))]
    ids = [BOS] + text[0]
    for n, rest in zip(soft, text[1:]):
        ids += [BOI] + [IMAGE] * n + [EOI] + rest
    input_ids = torch.tensor([ids])
    out = {"soft_tokens": np.array(soft), "prompt": np.array(ids)}

    write_e2b()
    for variant in ("causal", "vision", "e2b"):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(OUT / "target_mm_e2b" if variant == "e2b" else TARGET, tmp, dirs_exist_ok=True)
            config = json.loads((Path(tmp) / "config.json").read_text())
            if variant == "vision":
                config["text_config"]["use_bidirectional_attention"] = "vision"
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            model = Gemma4ForConditionalGeneration.from_pretrained(tmp).eval()
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      pixel_values=inputs["pixel_values"], image_position_ids=inputs["image_position_ids"],
                      mm_token_type_ids=(input_ids == IMAGE).long())
        with torch.no_grad():
            logits = model(**kwargs).logits[0, -1]
            greedy = model.generate(**kwargs, do_sample=False, max_new_tokens=MAX_NEW)[0, len(ids):]
        out[f"{variant}_last_logits"] = logits.numpy().astype(np.float32)
        out[f"{variant}_greedy"] = greedy.numpy()
        print(variant, "greedy", greedy.tolist())
    if np.array_equal(out["causal_greedy"], out["vision_greedy"]):
        print("note: both variants give the same greedy ids")
    print("max |logit difference| between variants:",
          float(np.abs(out["causal_last_logits"] - out["vision_last_logits"]).max()))
    np.savez(OUT / "reference.npz", **out)


if __name__ == "__main__":
    main()
