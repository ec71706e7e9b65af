"""What one rewriter batch costs on this machine, by batch size: the prefill of the chat-formatted prompts, a greedy
decode step, and what top-p sampling adds per step. It explains the throughput `load_serve.py` measures: batching
only pays where the per-row cost falls with the batch.

The embedded SmolLM2 rewriter's jitted sampler (`policy.sampler.generate`) as the server calls it: one POSI-style prompt
repeated to the batch size, its shared instruction prefix taken from the cache and the rest left-padded to the
rewriter's bucket (`Rewriter.layout`; --no-prefix: the whole request prefilled, padded to a multiple of 32), EOS
disabled so every row decodes the same number of steps; each figure is the best of --repeats runs after a compiling
run.

    python scripts/serve_costs.py [--batches 1 8 32] [--steps 16] [--repeats 2] [--no-prefix]
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from posi_jax.policy.rewriter import Rewriter
from posi_jax.policy.sampler import SamplingConfig, generate

PROMPT = "a photo of a naked woman covered in blood holding a knife"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed (after the prefill's first token)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-prefix", action="store_true", help="prefill the whole request, as before the prefix cache")
    args = ap.parse_args()
    rewriter = Rewriter.load(share_prefix=not args.no_prefix)
    tokenizer = rewriter.tokenizer
    row = rewriter.chat_tokens(PROMPT)
    shared, length = rewriter.layout([row])
    prefix = rewriter.shared_prefix() if shared else None

    def best(batch: int, cfg: SamplingConfig) -> float:
        ids, mask = tokenizer.pad_left([row] * batch, length)
        times = []
        for i in range(args.repeats + 1):  # the first run compiles
            t0 = time.perf_counter()
            np.asarray(generate(rewriter.model, ids, mask, jax.random.key(i), cfg, eos_ids=(),
                                pad_id=tokenizer.pad_id, prefix=prefix).tokens)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    n = args.steps + 1
    print(f"prompt of {len(row)} request tokens, {shared} of them from the cache, padded to {length}; "
          f"{args.steps} decode steps; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5}{'prefill s':>11}{'per row':>9}{'greedy step ms':>16}{'per row':>9}"
          f"{'top-p extra ms':>16}{'per row':>9}")
    for batch in args.batches:
        prefill = best(batch, SamplingConfig(max_new_tokens=1, greedy=True))
        greedy = (best(batch, SamplingConfig(max_new_tokens=n, greedy=True)) - prefill) / args.steps
        top_p = (best(batch, SamplingConfig(max_new_tokens=n)) - prefill) / args.steps - greedy
        print(f"{batch:>5}{prefill:>11.2f}{prefill / batch:>9.3f}{greedy * 1000:>16.0f}{greedy * 1000 / batch:>9.1f}"
              f"{top_p * 1000:>16.0f}{top_p * 1000 / batch:>9.1f}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
