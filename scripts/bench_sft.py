"""SFT train-step throughput: our jitted LoRA step (posi_jax.training.sft.make_train_step) vs a PyTorch step
(transformers LlamaForCausalLM + the same LoRA math written by hand: q/v adapters, r, alpha, dropout, AdamW, clip 1.0,
response-masked token-mean cross entropy), same config, same random batch, on CPU. Prints tokens/s, the ratio,
compile time (JAX, separately) and the peak RSS of each side. Timing runs all sides in one process with their steps
interleaved; each side's peak RSS comes from a separate child process that runs that side alone.

Our step evaluates the LM head only where the loss reads it (the response positions, half of this batch); the torch
step, like transformers' forward, evaluates it at every position. A third side, `jax-full-head`, runs our step with
the head at every position too, so the same-work ratio is printed as well.

    python scripts/bench_sft.py                      # SmolLM2-135M shapes, batch 4 x 128, LoRA q,v r8
    python scripts/bench_sft.py --layers 4 --steps 3 # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def batch_arrays(args, vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (args.batch, args.seq)).astype(np.int32)
    attn = np.ones((args.batch, args.seq), bool)
    loss = np.zeros((args.batch, args.seq), bool)
    loss[:, args.seq // 2:] = True  # second half = "response"
    return ids, attn, loss


def llama_cfg(args):
    from posi_jax.models.llama import LlamaConfig

    return LlamaConfig.smollm2_135m().replace(num_layers=args.layers)


def make_jax_step(args, full_head=False):
    """Build our jitted LoRA train step; returns (step() -> loss, compile-and-first-call seconds).

    Our step evaluates the LM head only at the positions the loss reads (`num_loss_targets`); with `full_head` it
    evaluates it at every position, as the torch step (transformers' forward) does: the same work on both sides."""
    import jax
    import optax
    from flax import nnx

    from posi_jax.models.llama import LlamaForCausalLM
    from posi_jax.nn.lora import LoRAParam, add_lora
    from posi_jax.training.sft import make_train_step, num_loss_targets

    cfg = llama_cfg(args)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    add_lora(model, ("q_proj", "v_proj"), rank=args.rank, alpha=2 * args.rank, dropout=0.1)
    model.train()
    graphdef, trainable, rng, frozen = nnx.split(model, LoRAParam, nnx.RngState, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx)
    ids, attn, loss = batch_arrays(args, cfg.vocab_size)
    num_targets = loss.size if full_head else num_loss_targets(loss)
    carry = [trainable, rng, opt_state]

    def run():
        carry[0], carry[1], carry[2], m = step(*carry, frozen, ids, attn, loss, num_targets=num_targets)
        return float(jax.block_until_ready(m["loss"]))

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def make_torch_step(args):
    """Build the PyTorch step (transformers + hand-written LoRA); returns (step() -> loss, first-call seconds)."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = llama_cfg(args)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa"))
    for p in model.parameters():
        p.requires_grad_(False)
    scale, drop = 2 * args.rank / args.rank, torch.nn.Dropout(0.1)
    lora_params = []

    def add(linear):
        a = torch.nn.Parameter(torch.empty(linear.in_features, args.rank).uniform_(-1, 1) / math.sqrt(linear.in_features))
        b = torch.nn.Parameter(torch.zeros(args.rank, linear.out_features))
        lora_params.extend([a, b])
        base = linear.forward
        linear.forward = lambda x: base(x) + (drop(x) @ a) @ b * scale

    for layer in model.model.layers:
        add(layer.self_attn.q_proj)
        add(layer.self_attn.v_proj)
    model.train()
    opt = torch.optim.AdamW(lora_params, lr=1e-4)
    ids, attn, loss_mask = (torch.from_numpy(x) for x in batch_arrays(args, c.vocab_size))
    ids, attn = ids.long(), attn.long()
    target_mask = loss_mask[:, 1:].float()

    def step():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        loss = (nll * target_mask).sum() / target_mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        opt.step()
        return float(loss)

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0


SIDES = ("jax", "jax-full-head", "torch")


def make_step(args, side):
    return make_torch_step(args) if side == "torch" else make_jax_step(args, full_head=side == "jax-full-head")


def child(args):
    """Memory mode: one side alone in this process, a few steps, so the parent can read its peak RSS."""
    step, _ = make_step(args, args.side)
    for _ in range(2):
        step()
    print("RESULT {}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)
    import torch

    # Memory first: each side alone in a child process (both models in one process would blur the peaks), started
    # before this process holds any model (a forked child's peak RSS starts at its parent's size).
    peak = {}
    for side in ("jax", "torch"):  # (jax-full-head's peak is jax's plus a larger logits buffer)
        cmd = [sys.executable, __file__, "--side", side] + [f"--{k}={getattr(args, k)}" for k in
                                                           ("layers", "batch", "seq", "rank")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0 or "RESULT" not in out:
            raise SystemExit(f"{side} side failed (status {status}): {out[-2000:]}")
        peak[side] = usage.ru_maxrss / 1024
    # Timing: both sides in this process, steps interleaved (ours, torch, ours, torch, ...), so a change in the
    # machine's speed during the run (a shared VM's neighbours) hits both sides alike.
    steps, first = {}, {}
    for side in SIDES:
        steps[side], first[side] = make_step(args, side)
    times = {side: [] for side in SIDES}
    for _ in range(args.steps):
        for side in SIDES:
            t0 = time.perf_counter()
            steps[side]()
            times[side].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(f"SmolLM2-135M shapes, {args.layers} layers, LoRA q,v r{args.rank}, batch {args.batch} x {args.seq} "
          f"({tokens} tokens/step), median of {args.steps} interleaved steps, torch threads {torch.get_num_threads()}; "
          f"load: {os.getloadavg()[0]:.1f}")
    print("| side | step (s) | tokens/s | first call (s) | peak RSS alone (MiB) |\n|---|---|---|---|---|")
    med = {side: float(np.median(t)) for side, t in times.items()}
    for side in SIDES:
        rss = f"{peak[side]:.0f}" if side in peak else "-"
        print(f"| {side} | {med[side]:.3f} | {tokens / med[side]:.0f} | {first[side]:.1f} | {rss} |")
    print(f"ratio (jax tokens/s ÷ torch tokens/s): {med['torch'] / med['jax']:.2f}x; with the LM head at every "
          f"position as torch computes it (jax-full-head): {med['torch'] / med['jax-full-head']:.2f}x")


if __name__ == "__main__":
    main()
