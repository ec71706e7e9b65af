"""Stable Diffusion v1.4 shapes on CPU: our jitted UNet and VAE decoder vs diffusers (torch), same random weights,
same inputs, one process. fp32.

  UNet: 859.5M parameters, latents [2, 64, 64, 4] (batch 2 = classifier-free guidance), text context [2, 77, 768].
  VAE decode: latents [1, 64, 64, 4] -> one 512x512 image.

Our model gets diffusers' freshly initialised torch weights through the same mapping table the folder loader uses
(posi_jax.weights.sd), so both compute the same function; the max abs difference of the outputs is printed too.
Compile time is reported separately; steady-state times are the best of --runs calls, ours and torch
interleaved. GFLOP counts are analytic: 2 * multiply-adds of every dot_general / conv in our jaxpr (scan bodies
times their trip count); GFLOP/s is that count over our time, compared with this machine's measured fp32 matmul peak (a jitted 4096^3 matmul, best of 5).

    .venv/bin/python scripts/bench_diffusion.py [--runs 3] [--only unet|vae]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from posi_jax.models.unet import UNet2DConditionModel, UNetConfig
from posi_jax.models.vae import AutoencoderKL, VAEConfig
from posi_jax.weights.common import fill_abstract
from posi_jax.weights.sd import UNET_TABLE, VAE_TABLE


# ---- analytic FLOPs from the jaxpr -----------------------------------------------------------------------------------
def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
        k = math.prod(rhs[d] for d in spec[1:])
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    return 0.0


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", None)
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += mult * jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += mult * jaxpr_flops(sub)
                elif inner is not None and isinstance(inner, jax.extend.core.Jaxpr):
                    total += mult * jaxpr_flops(inner)
    return total


# ---- helpers ----------------------------------------------------------------------------------------------------------
def best_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 4096, runs: int = 5) -> tuple[float, float]:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    ours = 2 * n ** 3 / best_time(lambda: mm(a).block_until_ready(), runs) / 1e9
    ta = torch.from_numpy(np.array(a))
    with torch.inference_mode():
        ref = 2 * n ** 3 / best_time(lambda: ta @ ta, runs) / 1e9
    return ours, ref


def ours_from_torch(torch_model, factory, table):
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return fill_abstract(nnx.eval_shape(factory), state.__getitem__, state.keys(), table, "torch state_dict")


def run_case(name, make_torch, make_ours, call_torch, call_ours, torch_inputs, inputs, runs):
    """Both models alive, calls interleaved (ours, torch, ours, torch, ...), so a change in the machine's speed
    during the run (a shared VM's neighbours) hits both sides alike. Our weights are a copy of the torch model's."""
    torch.manual_seed(0)
    ref = make_torch()
    n_params = sum(p.numel() for p in ref.parameters())
    model = ours_from_torch(ref, make_ours, make_ours.table)
    gc.collect()
    graphdef, params = nnx.split(model)
    del model

    def pure(params, *xs):
        return call_ours(nnx.merge(graphdef, params), *xs)

    flops = jaxpr_flops(jax.make_jaxpr(pure)(params, *inputs).jaxpr)
    t0 = time.perf_counter()
    compiled = jax.jit(pure).lower(params, *inputs).compile()
    compile_s = time.perf_counter() - t0
    out = np.asarray(compiled(params, *inputs))  # warm-up
    ours_times, torch_times = [], []
    with torch.inference_mode():
        want = call_torch(ref, *torch_inputs)  # warm-up
        for _ in range(runs):
            ours_times.append(best_time(lambda: compiled(params, *inputs).block_until_ready(), 1))
            torch_times.append(best_time(lambda: call_torch(ref, *torch_inputs), 1))
    ours_s, torch_s = min(ours_times), min(torch_times)
    del compiled, params, ref
    gc.collect()
    want = want.numpy().transpose(0, 2, 3, 1)
    err = float(np.max(np.abs(out.astype(np.float64) - want)))
    return dict(name=name.format(params=n_params / 1e6), torch_s=torch_s, ours_s=ours_s, compile_s=compile_s,
                gflop=flops / 1e9, err=err, scale=float(np.abs(want).max()))


def _factory(fn, table):
    fn.table = table
    return fn


def bench_unet(runs):
    from diffusers import UNet2DConditionModel as TorchUNet

    cfg = UNetConfig()  # defaults = SD v1.4's unet/config.json
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 64, 4), np.float32)
    ctx = rng.standard_normal((2, 77, 768), np.float32)
    t = np.array([801, 801], np.int32)
    torch_inputs = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64)),
                    torch.from_numpy(ctx))
    return run_case("UNet fwd, batch 2, 64x64 latents ({params:.1f}M params)",
                    lambda: TorchUNet(**dataclasses.asdict(cfg)).eval(),
                    _factory(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), UNET_TABLE),
                    lambda m, a, b, c: m(a, b, c).sample, lambda m, a, b, c: m(a, b, c), torch_inputs,
                    (jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)), runs)


def bench_vae(runs):
    from diffusers import AutoencoderKL as TorchVAE

    cfg = VAEConfig()
    z = np.random.default_rng(1).standard_normal((1, 64, 64, 4), np.float32)
    return run_case("VAE decode, 1 image 512x512 ({params:.1f}M params)",
                    lambda: TorchVAE(**dataclasses.asdict(cfg), down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4).eval(),
                    _factory(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)), VAE_TABLE),
                    lambda m, a: m.decode(a).sample, lambda m, a: m.decode(a),
                    (torch.from_numpy(z.transpose(0, 3, 1, 2).copy()),), (jnp.asarray(z),), runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["unet", "vae"])
    args = ap.parse_args()
    load = os.getloadavg()[0]
    peak, torch_peak = matmul_peak()
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {load:.1f} at start; fp32")
    print(f"measured fp32 matmul peak (4096^3): ours (XLA) {peak:.1f} GFLOP/s, torch {torch_peak:.1f} GFLOP/s")
    rows = []
    if args.only in (None, "unet"):
        rows.append(bench_unet(args.runs))
    if args.only in (None, "vae"):
        rows.append(bench_vae(args.runs))
    print("| case | torch s | ours s | speed-up (torch/ours) | ours compile s | GFLOP | ours GFLOP/s | % of matmul "
          "peak | max abs diff (output scale) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gfs = r["gflop"] / r["ours_s"]
        print(f"| {r['name']} | {r['torch_s']:.2f} | {r['ours_s']:.2f} | {r['torch_s'] / r['ours_s']:.2f}x | "
              f"{r['compile_s']:.1f} | {r['gflop']:.0f} | {gfs:.1f} | {100 * gfs / peak:.0f}% | "
              f"{r['err']:.1e} ({r['scale']:.2f}) |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB; "
          f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
