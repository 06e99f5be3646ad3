#!/usr/bin/env python
"""Prefill of a prompt with images, and decoding after it, with the drafter and without.

    python scripts/bench_images.py TARGET DRAFTER [--image FILE ...] [--tokens N] [--repeats R]

One process, one loaded pair: per mode (plain decoding, K = 0; MTP with K chosen each round;
MTP at a fixed K), R greedy generations of N tokens after a chat prompt that holds the
images, and the fastest of each: the vision tower's time, the prompt's read (images
included) to the first token, decode tokens/s after it, and the drafts' acceptance. Greedy
output is checked equal across modes.
"""

import argparse
import time

import mlx_mtp  # before mlx.core: MKL

import mlx.core as mx

from mlx_mtp.conversation import render


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target")
    ap.add_argument("drafter")
    ap.add_argument("--image", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=2, help="the fixed K of the third mode")
    args = ap.parse_args()
    pair = mlx_mtp.load(args.target, args.drafter)
    images = mlx_mtp.prepare_images(pair, args.image)
    tower = pair.target.vision.tower(pair.target.hidden_size, pair.target.dtype)
    tower_time = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        mx.eval(tower(images))
        tower_time.append(time.perf_counter() - tic)
    question = "Describe the picture."
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = render(pair, [{"role": "user", "content": parts}])
    image_text = pair.tokenizer.convert_ids_to_tokens(pair.target.vision.image_token)
    if prompt.count(image_text) != len(images):  # a template without image parts: the raw question
        prompt = question  # (the images go after BOS)
    print(f"images: {', '.join(args.image)}; soft tokens {[i.soft_tokens for i in images]}; "
          f"vision tower {min(tower_time) * 1e3:.1f} ms")
    outputs = {}
    print("| mode | prompt tokens | prompt read, s | decode tok/s | acceptance | mean accepted | per position |")
    print("|---|---|---|---|---|---|---|")
    for mode, k in (("plain (K=0)", 0), ("MTP, K auto", None), (f"MTP, K={args.k}", args.k)):
        best = None
        for _ in range(args.repeats):
            out = mlx_mtp.generate(pair, prompt, images=images, max_tokens=args.tokens, num_draft_tokens=k)
            outputs.setdefault(mode, out.tokens)
            assert out.tokens == outputs[mode]
            if best is None or out.stats.generation_tps > best.generation_tps:
                best = out.stats
        per = " ".join(f"{a:.2f}" for a in best.per_position_acceptance) if k != 0 else "-"
        acc = f"{best.acceptance_rate:.2f}" if k != 0 else "-"
        mean = f"{best.mean_accepted_length:.2f}" if k != 0 else "-"
        print(f"| {mode} | {best.prompt_tokens} | {best.prompt_time:.3f} | {best.generation_tps:.1f} | {acc} | {mean} | {per} |")
    same = len({tuple(t) for t in outputs.values()}) == 1
    print(f"greedy output identical across modes: {same}")
    assert same


if __name__ == "__main__":
    main()
