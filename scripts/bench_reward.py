"""POSI reward throughput: our one-jit reward (posi_jax.reward.posi) vs a PyTorch reimplementation of the upstream
reward path (diffusers StableDiffusionPipeline -> PIL images -> open_clip preprocess -> open_clip ViT-L/14 + Q16 and
ViT-B/32 CLIP score -> the upstream formula), same weights, same initial noise, steps, guidance and images per prompt.

SD is a small random SD-v1-topology model (4 UNet blocks, 128x128 images); the CLIPs are the full-size OpenAI
ViT-L/14 and ViT-B/32 shapes with random open_clip weights (`--clip small` for small ones) and the real Q16 prompts.
Before timing, it checks (assertions) one full-size ViT-L/14 image forward of ours vs open_clip (<= 1e-4 max abs)
— too slow for the test suite on 2 cores — and that both rewards agree.

Throughput: one warm-up call each (ours: compile time reported separately), then the mean of --repeats calls,
ours and torch interleaved.

    .venv/bin/python scripts/bench_reward.py [--prompts 2] [--images 4] [--steps 20] [--repeats 2] [--clip full]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # fp32 parity
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["a photo of a naked woman covered in blood", "a cute dog playing in a park on a sunny day",
           "a soldier shooting civilians, war photography", "portrait of an old man, oil painting",
           "two people fighting with knives in a bar", "a bowl of fruit on a wooden table"]
Q16_PROMPTS = "posi:q16_prompts.p"  # the POSI data resolver: $POSI_DATA, ../shared/data/posi or the cache

# A small SD v1 topology: 3 cross-attention down blocks + 1 plain, 16x16 latents, 128x128 images.
UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128, 128),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=256,
            attention_head_dim=4, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=16, sample_size=128, scaling_factor=0.18215)
SMALL_CLIPS = {  # (open_clip CLIP kwargs) ViT-L/14- and ViT-B/32-shaped small
    "q16": dict(embed_dim=768, vision_cfg=dict(image_size=224, patch_size=14, width=128, layers=2, head_width=32),
                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1)),
    "clip": dict(embed_dim=64, vision_cfg=dict(image_size=224, patch_size=32, width=128, layers=2, head_width=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=2)),
}


def build_sd_folder(folder: Path) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.sd_fixtures import SCHEDULER_V14, TEXT_VOCAB, write_clip_tokenizer_folder

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=TEXT_VOCAB, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=TEXT_VOCAB - 2,
                                        eos_token_id=TEXT_VOCAB - 1, pad_token_id=TEXT_VOCAB - 1))
    write_clip_tokenizer_folder(folder / "tokenizer")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(),
                                   tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")), unet=unet.eval(),
                                   scheduler=PNDMScheduler(**SCHEDULER_V14), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def build_clips(kind: str):
    """(torch Q16 CLIP, torch CLIP, our Q16 vision tower, our CLIPModel, Q16 prompts): random open_clip weights."""
    import open_clip
    from flax import nnx

    from posi_jax.models.clip import CLIP_VIT_B32, CLIP_VIT_L14, CLIPModel, CLIPVisionTransformer
    from posi_jax.reward.q16 import load_q16_prompts
    from posi_jax.weights.clip import OPENAI_TABLE, clip_rules, openai_config_from_state
    from posi_jax.weights.common import fill_abstract

    torch.manual_seed(1)
    if kind == "full":
        q16_ref = open_clip.model.CLIP(**dict(open_clip.get_model_config("ViT-L-14"), quick_gelu=True)).eval()
        clip_ref = open_clip.model.CLIP(**dict(open_clip.get_model_config("ViT-B-32"), quick_gelu=True)).eval()
        q16_cfg, clip_cfg = CLIP_VIT_L14, CLIP_VIT_B32
        q16_prompts = load_q16_prompts(Q16_PROMPTS)
    else:
        q16_ref = open_clip.model.CLIP(**SMALL_CLIPS["q16"], quick_gelu=True).eval()
        clip_ref = open_clip.model.CLIP(**SMALL_CLIPS["clip"], quick_gelu=True).eval()
        q16_cfg = clip_cfg = None
        q16_prompts = load_q16_prompts(Q16_PROMPTS)
    q16_state = {k: v.detach().numpy() for k, v in q16_ref.state_dict().items()}
    clip_state = {k: v.detach().numpy() for k, v in clip_ref.state_dict().items()}
    if q16_cfg is None:  # small: heads from the open_clip kwargs (width // head_width), not width // 64
        import dataclasses

        def with_heads(state, kw):
            cfg = openai_config_from_state(state, "quick_gelu", "small")
            return dataclasses.replace(
                cfg, text=dataclasses.replace(cfg.text, num_heads=kw["text_cfg"]["heads"]),
                vision=dataclasses.replace(cfg.vision, num_heads=kw["vision_cfg"]["width"] // kw["vision_cfg"]["head_width"]))
        q16_cfg, clip_cfg = with_heads(q16_state, SMALL_CLIPS["q16"]), with_heads(clip_state, SMALL_CLIPS["clip"])
    q16_vision = fill_abstract(nnx.eval_shape(lambda: CLIPVisionTransformer(q16_cfg.vision, rngs=nnx.Rngs(0))),
                               q16_state.__getitem__, q16_state.keys(), clip_rules(OPENAI_TABLE, "vision"), "q16 CLIP")
    clip = fill_abstract(nnx.eval_shape(lambda: CLIPModel(clip_cfg, rngs=nnx.Rngs(0))), clip_state.__getitem__,
                         clip_state.keys(), clip_rules(OPENAI_TABLE, "model"), "CLIP")
    return q16_ref, clip_ref, q16_vision, clip, q16_prompts


def check_image_forward(q16_ref, q16_vision, label: str) -> float:
    """One image through the ViT-L/14 vision tower, ours vs open_clip: max abs error of the image embedding."""
    size = q16_vision.config.image_size
    pixels = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        want = q16_ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(jax.jit(lambda m, x: m.encode(x))(q16_vision, pixels))
    err = float(np.abs(got - want).max())
    print(f"{label} image forward, ours vs open_clip: max abs {err:.2e} (embedding scale {np.abs(want).max():.2f})")
    assert err <= 1e-4, err
    return err


class TorchUpstreamReward:
    """The upstream reward path in PyTorch: diffusers pipeline -> PIL -> open_clip preprocess -> Q16 + CLIP score."""

    def __init__(self, folder, q16_ref, clip_ref, q16_prompts, n: int, steps: int, guidance: float):
        import open_clip
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.q16_ref, self.clip_ref = q16_ref, clip_ref
        self.prompts = torch.from_numpy(q16_prompts)
        self.pre_q16 = open_clip.image_transform(q16_ref.visual.image_size[0], is_train=False)
        self.pre_clip = open_clip.image_transform(clip_ref.visual.image_size[0], is_train=False)
        self.tokenize = open_clip.tokenize
        self.n, self.steps, self.guidance = n, steps, guidance

    @torch.no_grad()
    def __call__(self, prompts: list[str], latents_nchw: torch.Tensor) -> np.ndarray:
        images = self.pipe(prompts, num_images_per_prompt=self.n, num_inference_steps=self.steps,
                           guidance_scale=self.guidance, latents=latents_nchw, output_type="pil").images
        feats = self.q16_ref.encode_image(torch.stack([self.pre_q16(im) for im in images]))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        text_feats = self.prompts / self.prompts.norm(dim=-1, keepdim=True)
        q16 = (100.0 * feats @ text_feats.T).softmax(dim=-1)[:, 1].reshape(len(prompts), self.n)
        img = self.clip_ref.encode_image(torch.stack([self.pre_clip(im) for im in images]))
        txt = self.clip_ref.encode_text(self.tokenize(prompts)).repeat_interleave(self.n, dim=0)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).reshape(len(prompts), self.n)
        return np.array([(5 - 5 * float(q.mean())) + min(float(c.mean()), 0.31) for q, c in zip(q16, cos)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clip", choices=("full", "small"), default="full")
    args = ap.parse_args()
    from posi_jax.models.clip_tokenizer import CLIPTokenizer
    from posi_jax.diffusion.pipeline import StableDiffusion
    from posi_jax.reward.posi import PosiReward, RewardConfig

    prompts = (PROMPTS * 4)[:args.prompts]
    n_images = args.prompts * args.images
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = build_sd_folder(Path(tmp) / "sd")
        q16_ref, clip_ref, q16_vision, clip, q16_prompts = build_clips(args.clip)
        print(f"setup {time.perf_counter() - t0:.1f}s; CLIPs: {args.clip}; device {jax.devices()[0].device_kind}, "
              f"torch threads {torch.get_num_threads()}; load: {os.getloadavg()}")
        if args.clip == "full":
            check_image_forward(q16_ref, q16_vision, "full-size ViT-L/14")

        cfg = RewardConfig(images_per_prompt=args.images, steps=args.steps, guidance_scale=7.0, seed_policy="fixed")
        ours = PosiReward(StableDiffusion.from_folder(folder, mesh=None), q16_vision, q16_prompts, clip,
                          CLIPTokenizer.from_open_clip(), cfg, mesh=None)
        ref = TorchUpstreamReward(folder, q16_ref, clip_ref, q16_prompts, args.images, args.steps, 7.0)
        latents = ours.inputs(prompts)[2]
        latents_nchw = torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy())

        t = time.perf_counter()
        first = ours(prompts).reward
        ours_first = time.perf_counter() - t
        ref_reward = ref(prompts, latents_nchw)  # warm-up
        ours_s, torch_s = [], []
        for _ in range(args.repeats):  # interleaved, so a change in the machine's speed hits both sides alike
            t = time.perf_counter()
            out = ours(prompts)
            ours_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref_reward = ref(prompts, latents_nchw)
            torch_s.append(time.perf_counter() - t)
        np.testing.assert_array_equal(out.reward, first)

    diff = float(np.abs(out.reward - ref_reward).max())
    print(f"rewards ours  {np.round(out.reward, 5).tolist()} (q16 {np.round(out.q16, 4).tolist()}, "
          f"clip {np.round(out.clip_score, 4).tolist()})")
    print(f"rewards torch {np.round(ref_reward, 5).tolist()}; max abs difference {diff:.2e}")
    assert diff <= 1e-2, diff  # same weights and noise; preprocessing within a grey level of PIL's
    o, r = float(np.mean(ours_s)), float(np.mean(torch_s))
    print(f"\n{args.prompts} prompts x {args.images} images, {args.steps} steps (PNDM), guidance 7, 128x128, fp32, "
          f"CLIPs {args.clip}; mean of {args.repeats} calls after one warm-up")
    print("| impl | s/call | prompts/s | images/s |")
    print("|---|---|---|---|")
    print(f"| ours (JAX, one jit) | {o:.2f} | {args.prompts / o:.3f} | {n_images / o:.3f} |")
    print(f"| torch upstream path | {r:.2f} | {args.prompts / r:.3f} | {n_images / r:.3f} |")
    print(f"ratio ours/torch throughput: {r / o:.2f}x (goal >= 1.5x); our compile (first call - steady): "
          f"{ours_first - o:.1f}s; load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
