"""Generation throughput: our jitted sampler vs transformers `generate` (torch), same SmolLM2-135M-Instruct weights
(dequantized from the shipped GGUF into both), greedy, 64 new tokens, batch 1 and 8, one process.

EOS is disabled in both (no stopping, no suppression) so every row produces exactly 64 tokens. Compile time is
reported separately (first call); steady-state numbers are the best of --repeats runs, ours and torch interleaved.

    .venv/bin/python scripts/bench_generate.py [--new-tokens 64] [--batches 1 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch

from posi_jax.checkpoints import load_policy
from posi_jax.policy.load import default_gguf_path
from posi_jax.policy.sampler import SamplingConfig, generate

PROMPTS = ["a photo of a naked woman covered in blood", "a cute dog playing in a park on a sunny day",
           "a soldier shooting civilians, war photography", "portrait of an old man, oil painting",
           "two people fighting with knives in a bar", "a bowl of fruit on a wooden table",
           "a zombie eating a human brain, gore", "a castle on a hill at sunset, fantasy art"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    ours, tok = load_policy(path)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # No EOS on the torch side either: without an eos_token_id, generate neither stops early nor suppresses EOS.
    # (`min_new_tokens` would suppress EOS logits, so a row whose greedy choice is EOS would diverge from ours.)
    ref.generation_config.eos_token_id = None
    n = args.new_tokens
    cfg = SamplingConfig(max_new_tokens=n, greedy=True)
    print(f"device: {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}, new tokens {n}, greedy, fp32")
    print(f"| batch | ours compile s | ours s | ours tok/s | torch s | torch tok/s | ratio ours/torch |")
    print(f"|---|---|---|---|---|---|---|")
    for b in args.batches:
        rows = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in (PROMPTS * 4)[:b]]
        ids, mask = tok.pad_left(rows)
        t0 = time.perf_counter()
        out = generate(ours, ids, mask, jax.random.key(0), cfg, eos_ids=(), pad_id=tok.pad_id)
        out.tokens.block_until_ready()
        compile_s = time.perf_counter() - t0
        ours_s, torch_s = [], []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's speed hits both sides alike
            t0 = time.perf_counter()
            out = generate(ours, ids, mask, jax.random.key(0), cfg, eos_ids=(), pad_id=tok.pad_id)
            out.tokens.block_until_ready()
            ours_s.append(time.perf_counter() - t0)
            with torch.no_grad():
                t0 = time.perf_counter()
                ref_out = ref.generate(torch.tensor(ids, dtype=torch.long),
                                       attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=n,
                                       do_sample=False, pad_token_id=tok.pad_id)
                torch_s.append(time.perf_counter() - t0)
        assert int(np.asarray(out.mask).sum()) == b * n
        assert ref_out.shape[1] - ids.shape[1] == n
        same = (ref_out[:, ids.shape[1]:].numpy() == np.asarray(out.tokens)).mean()
        o, t = min(ours_s), min(torch_s)
        print(f"| {b} | {compile_s - o:.1f} | {o:.3f} | {b * n / o:.0f} | {t:.3f} | {b * n / t:.0f} | {t / o:.2f}x |"
              f"  (greedy tokens equal: {same:.0%})")


if __name__ == "__main__":
    main()
