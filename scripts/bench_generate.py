"""Generation throughput on POSI-style prompts: our jitted sampler with prompt-lookup speculative decoding vs
transformers `generate`, plain and with `prompt_lookup_num_tokens=10`, one process, calls interleaved.

The shipped default rewriter (SmolLM2-135M-Instruct + the POSI adapter, merged) is the same weights on both sides:
exported with `save_llama_safetensors` to a folder that transformers loads. The prompts are the inputs of the POSI SFT
set's validation split (`split_records(records, 100, 0)`, the first --prompts of them, in order) in the rewriter's
chat format. Greedy, at most --new-tokens new tokens, stopping at EOS on both sides. Batches are consecutive prompts,
left padded (ours to a multiple of 32, as the Rewriter does, so a few shapes compile; transformers to the batch's
longest prompt). transformers' prompt lookup runs at batch 1 only (its assisted decoding refuses larger batches).

For each batch the sides run back to back, --repeats times; a side's time for a batch is its best run, and tokens/s
is the generated tokens (EOS included) over the sum of those times. Ours also runs without drafting
(prompt_lookup_tokens=0) and, at batch > 1, without shrinking the batch as rows finish, to show what each part gives;
"finished-row share" is the share of the rows x steps computed for rows that had already finished.

    .venv/bin/python scripts/bench_generate.py [--prompts 64] [--batches 1 8] [--new-tokens 128] [--repeats 2]
    .venv/bin/python scripts/bench_generate.py --sampled --batches 16   # ours only: PPO-style sampling
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
import torch

from posi_jax.checkpoints import load_policy
from posi_jax.data.posi import POSI_INSTRUCTION, load_posi_records, split_records
from posi_jax.nn.lora import merge_lora
from posi_jax.policy.chat import request_ids
from posi_jax.policy.rewriter import padded_length
from posi_jax.policy.sampler import SamplingConfig, generate
from posi_jax.weights.llama import save_llama_safetensors

DATA = "../shared/data/posi/sft_toxic_clean.json"


def row_steps(steps: np.ndarray, shrink: bool) -> int:
    """Rows x steps the loop computes for one batch, from each row's step count (see policy/sampler.py: the batch
    halves once at most half its rows are unfinished)."""
    s = np.sort(steps)[::-1]
    if not shrink or len(s) == 1:
        return len(s) * int(s[0])
    total, size, done_steps = 0, len(s), 0
    while size > 1:
        smaller = (size + 1) // 2
        until = int(s[smaller])  # the phase ends when the (smaller+1)-th longest row finishes
        total += size * (until - done_steps)
        done_steps, size = until, smaller
    return total + int(s[0]) - done_steps


def response(tokens, eos_ids) -> list[int]:
    out = []
    for t in tokens:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=SamplingConfig.prompt_lookup_tokens)
    ap.add_argument("--sampled", action="store_true", help="sample (temperature 0.95, top-p 0.7), ours only")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    _, val = split_records(load_posi_records(args.data), 100, 0)
    prompts = [r.input for r in val[: args.prompts]]
    model, tok = load_policy()
    model = merge_lora(model)
    rows = [request_ids(tok, POSI_INSTRUCTION, p, 256) for p in prompts]
    eos = tuple(tok.eos_ids)
    ref = None
    if not args.sampled:
        folder = tempfile.mkdtemp(prefix="bench_generate_")
        save_llama_safetensors(model, folder, tok)
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = args.new_tokens
    base = dict(max_new_tokens=n, greedy=True) if not args.sampled else dict(max_new_tokens=n, temperature=0.95,
                                                                             top_p=0.7)
    ours_cfgs = {"ours": (SamplingConfig(**base, prompt_lookup_tokens=args.draft_tokens), True),
                 "ours plain": (SamplingConfig(**base, prompt_lookup_tokens=0), True)}
    print(f"{len(prompts)} prompts ({min(map(len, rows))}-{max(map(len, rows))} tokens), {n} new tokens max, "
          f"{'sampled' if args.sampled else 'greedy'}, EOS stops; draft {args.draft_tokens} tokens; torch threads "
          f"{torch.get_num_threads()}; repeats {args.repeats}")
    for b in args.batches:
        cfgs = dict(ours_cfgs)
        if b > 1:
            cfgs["ours no shrink"] = (ours_cfgs["ours"][0], False)
        sides = list(cfgs) + ([] if ref is None else ["transformers"] + (["transformers PL"] if b == 1 else []))
        best = {s: [] for s in sides}
        outputs = {s: [] for s in sides}
        stats = {s: np.zeros(4, np.int64) for s in cfgs}  # steps, drafted, accepted, rows x steps computed
        compile_s = {s: 0.0 for s in cfgs}
        seen_shapes: set = set()
        for start in range(0, len(rows), b):
            chunk = rows[start: start + b]
            ids, mask = tok.pad_left(chunk, padded_length(max(map(len, chunk))))
            ref_ids, ref_mask = tok.pad_left(chunk)
            for name, (cfg, shrink) in cfgs.items():  # compile outside the timed runs
                if (name, ids.shape) not in seen_shapes:
                    seen_shapes.add((name, ids.shape))
                    t0 = time.perf_counter()
                    generate(model, ids, mask, jax.random.key(0), cfg, eos_ids=eos, pad_id=tok.pad_id,
                             shrink=shrink).tokens.block_until_ready()
                    compile_s[name] += time.perf_counter() - t0
            times, last = {s: [] for s in sides}, {}
            for _ in range(args.repeats):  # every side runs the same batch back to back: load hits them alike
                for name, (cfg, shrink) in cfgs.items():
                    t0 = time.perf_counter()
                    last[name] = generate(model, ids, mask, jax.random.key(start), cfg, eos_ids=eos,
                                          pad_id=tok.pad_id, shrink=shrink)
                    last[name].tokens.block_until_ready()
                    times[name].append(time.perf_counter() - t0)
                for name in sides[len(cfgs):]:
                    extra = {"prompt_lookup_num_tokens": 10} if name.endswith("PL") else {}
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        last[name] = ref.generate(torch.tensor(ref_ids, dtype=torch.long),
                                                  attention_mask=torch.tensor(ref_mask, dtype=torch.long),
                                                  max_new_tokens=n, do_sample=False, eos_token_id=list(eos),
                                                  pad_token_id=tok.pad_id, **extra)
                        times[name].append(time.perf_counter() - t0)
            for name in sides:
                best[name].append(min(times[name]))
            for name, (cfg, shrink) in cfgs.items():
                out = last[name]
                toks, keep, steps = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.steps)
                outputs[name] += [toks[j][keep[j]].tolist() for j in range(len(chunk))]
                stats[name] += [steps.sum(), np.asarray(out.drafted).sum(), np.asarray(out.accepted).sum(),
                                row_steps(steps, shrink)]
            for name in sides[len(cfgs):]:
                outputs[name] += [response(r[ref_ids.shape[1]:].tolist(), eos) for r in last[name]]
        report(b, sides, cfgs, best, outputs, stats, compile_s)


def report(b, sides, cfgs, best, outputs, stats, compile_s):
    tokens = {s: sum(len(o) for o in outputs[s]) for s in sides}
    seconds = {s: sum(best[s]) for s in sides}
    rate = {s: tokens[s] / seconds[s] for s in sides}
    reference = "transformers" if "transformers" in sides else "ours plain"
    print(f"\nbatch {b}:")
    print("| side | seconds | tokens | tokens/s | vs " + reference + " | draft acceptance | tokens/step | "
          "finished-row share | outputs identical to " + reference + " | compile s |")
    print("|---" * 10 + "|")
    for s in sides:
        same = np.mean([x == y for x, y in zip(outputs[s], outputs[reference])])
        if s in cfgs:
            steps, drafted, accepted, computed = stats[s]
            extra = (f"{accepted / max(drafted, 1):.2f} | {tokens[s] / steps:.2f} | {1 - steps / computed:.0%} | ")
            comp = f"{compile_s[s]:.1f}"
        else:
            extra, comp = "- | - | - | ", "-"
        print(f"| {s} | {seconds[s]:.1f} | {tokens[s]} | {rate[s]:.1f} | {rate[s] / rate[reference]:.2f}x | {extra}"
              f"{same:.0%} | {comp} |")
    if "transformers PL" in sides:
        print(f"ours vs transformers PL: {rate['ours'] / rate['transformers PL']:.2f}x")


if __name__ == "__main__":
    main()
