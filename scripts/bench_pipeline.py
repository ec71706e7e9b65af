"""A whole Stable Diffusion v1.4-shape text-to-image run on CPU, ours (JAX) vs diffusers (torch): time and peak memory.

Random weights at SD v1.4 shapes (UNet 860M, VAE 84M, CLIP ViT-L/14 text tower 123M), fp32, one 512x512 image,
classifier-free guidance (UNet batch 2), the PNDM scheduler of SD v1.4. Each side runs in its own subprocess so the
peak resident memory (VmHWM) of one does not include the other's. Each side runs the pipeline at two step counts;
seconds per denoising step = the difference of the two totals over the difference of UNet evaluations (both sides
run the same number of UNet evaluations: PNDM evaluates N + 1 times for N steps). Ours is timed on a second call
after a first that compiles; compile time = first call - second call. Our memory stays flat in the number of steps
(the loop is one lax.scan).

    .venv/bin/python scripts/bench_pipeline.py [--steps 1 5] [--size 512]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

PROMPT = "a photograph of an astronaut riding a horse"
SD14_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                      clip_sample=False, trained_betas=None)
SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def peak_rss_gib() -> float:
    """High-water resident set size of this process (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2 ** 20
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_ours(steps: list[int], size: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from posi_jax.models.clip_tokenizer import CLIPTokenizer
    from posi_jax.diffusion.pipeline import StableDiffusion
    from posi_jax.models.clip import CLIPTextConfig, CLIPTextTransformer
    from posi_jax.models.unet import UNet2DConditionModel, UNetConfig
    from posi_jax.models.vae import AutoencoderKL, VAEConfig

    t0 = time.perf_counter()
    rngs = nnx.Rngs(0)
    text = CLIPTextTransformer(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12,
                                              num_heads=12, projection_dim=None), rngs=rngs)
    unet = UNet2DConditionModel(UNetConfig(), rngs=rngs)
    vae = AutoencoderKL(VAEConfig(), rngs=rngs)
    sd = StableDiffusion(text, CLIPTokenizer.from_open_clip(), unet, vae, SD14_SCHEDULER, mesh=None)
    params = sum(x.size for m in (text, unet, vae) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    out = dict(impl="ours (JAX)", params_m=params / 1e6, init_s=time.perf_counter() - t0, rss_after_init_gib=rss_gib())
    latents = sd.initial_latents(0, 1, size, size)
    for n in steps:
        t = time.perf_counter()
        sd.generate([PROMPT], steps=n, guidance_scale=7.5, height=size, width=size, latents=latents) \
            .block_until_ready()
        first = time.perf_counter() - t
        t = time.perf_counter()
        images = sd.generate([PROMPT], steps=n, guidance_scale=7.5, height=size, width=size, latents=latents)
        images.block_until_ready()
        out[f"total_s@{n}"] = time.perf_counter() - t
        out[f"compile_s@{n}"] = first - out[f"total_s@{n}"]
        out[f"peak_rss_gib_after@{n}"] = peak_rss_gib()
        assert np.isfinite(np.asarray(images)).all()
    out["evals"] = {n: len(sd.sched.timesteps(n)) for n in steps}
    out["jax_devices"] = str(jax.devices())
    return out


def _hf_clip_tokenizer():
    """transformers' CLIPTokenizer over the full OpenAI BPE vocabulary shipped with open_clip (no download)."""
    import open_clip
    from transformers import CLIPTokenizer

    from posi_jax.models.clip_tokenizer import _OPEN_CLIP_MERGES, EOT, SOT, _bytes_to_unicode

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1:_OPEN_CLIP_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return CLIPTokenizer(vocab={s: i for i, s in enumerate(symbols)}, merges=merges, pad_token=EOT,
                         model_max_length=77)


def run_diffusers(steps: list[int], size: int) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=_hf_clip_tokenizer(),
                                   unet=unet.eval(), scheduler=PNDMScheduler.from_config(SD14_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for m in (text, unet, vae) for p in m.parameters())
    out = dict(impl="diffusers (torch)", params_m=params / 1e6, init_s=time.perf_counter() - t0,
               rss_after_init_gib=rss_gib(), torch_threads=torch.get_num_threads())
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    for n in steps:
        t = time.perf_counter()
        images = pipe(PROMPT, num_inference_steps=n, guidance_scale=7.5, height=size, width=size,
                      latents=latents, output_type="np").images
        out[f"total_s@{n}"] = time.perf_counter() - t
        out[f"peak_rss_gib_after@{n}"] = peak_rss_gib()
        assert np.isfinite(images).all()
        out.setdefault("evals", {})[n] = len(pipe.scheduler.timesteps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs=2, default=[1, 5], help="the two step counts (default 1 5)")
    ap.add_argument("--size", type=int, default=512, help="image height = width (default 512)")
    ap.add_argument("--only", choices=("ours", "diffusers"), help="run one side")
    ap.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = (run_ours if args.worker == "ours" else run_diffusers)(sorted(args.steps), args.size)
        print("RESULT " + json.dumps(result))
        return

    lo, hi = sorted(args.steps)
    results = {}
    for impl in ("ours", "diffusers"):
        if args.only and impl != args.only:
            continue
        cmd = [sys.executable, __file__, "--worker", impl, "--steps", str(lo), str(hi), "--size", str(args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__)))))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{impl} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[impl] = r = json.loads(lines[-1][len("RESULT "):])
        evals = {int(k): v for k, v in r["evals"].items()}
        r["s_per_step"] = (r[f"total_s@{hi}"] - r[f"total_s@{lo}"]) / (evals[hi] - evals[lo])
        print(json.dumps(r), flush=True)

    print(f"\nSD v1.4 shapes, random weights, fp32, {args.size}x{args.size}, batch 1 with CFG (UNet batch 2), PNDM; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end")
    head = f"{'':20s} {'params':>8s} {'compile s':>10s} {'s/step':>8s} {f'total@{lo} s':>12s} " \
           f"{f'total@{hi} s':>12s} {'peak RSS GiB':>13s}"
    print(head)
    for impl, r in results.items():
        compile_s = r.get(f"compile_s@{hi}")
        print(f"{r['impl']:20s} {r['params_m']:7.0f}M {('%.1f' % compile_s) if compile_s is not None else '-':>10s} "
              f"{r['s_per_step']:8.2f} {r[f'total_s@{lo}']:12.1f} {r[f'total_s@{hi}']:12.1f} "
              f"{r[f'peak_rss_gib_after@{hi}']:13.2f}")
    if len(results) == 2:
        o, d = results["ours"], results["diffusers"]
        print(f"speed ratio (diffusers s/step / ours s/step): {d['s_per_step'] / o['s_per_step']:.2f}x; "
              f"total@{hi}: {d[f'total_s@{hi}'] / o[f'total_s@{hi}']:.2f}x")


if __name__ == "__main__":
    main()
