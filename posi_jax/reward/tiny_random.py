"""The full POSI reward over tiny random-weight models, built in memory from a seed (no files, no downloads).

For CPU smoke runs of the PPO loop (configs/ppo_smollm2_tiny_sd.yaml, `reward.kind: tiny_random`): the same code path
as the real reward (`PosiReward`: SD denoising loop, VAE decode, CLIP preprocessing, Q16, CLIP score, formula), with
SD v1-shaped but tiny UNet / VAE / text encoder (8x8 latents, 16x16 images), a tiny "ViT-L/14" vision tower for Q16
(patch 14, projection 768 so the real Q16 prompts apply) and a tiny "ViT-B/32" CLIP. Both text sides use the real
CLIP BPE tokenizer shipped with open_clip. The scores are meaningless; the timing and the plumbing are what it tests.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from posi_jax.reward.posi import PosiReward, RewardConfig

# SD v1.4's scheduler (PNDM, as in its scheduler_config.json).
SD14_SCHEDULER = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                      trained_betas=None, prediction_type="epsilon", timestep_spacing="leading")


def tiny_random_reward(config: RewardConfig = RewardConfig(), *, seed: int = 0, q16_prompts=None,
                       mesh=None) -> PosiReward:
    """A `PosiReward` over tiny random models. `q16_prompts`: the real [2, 768] prompts (default: random ones)."""
    from posi_jax.models.clip_tokenizer import CLIPTokenizer
    from posi_jax.diffusion.pipeline import StableDiffusion
    from posi_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig,
                                      CLIPVisionTransformer)
    from posi_jax.models.unet import UNet2DConditionModel, UNetConfig
    from posi_jax.models.vae import AutoencoderKL, VAEConfig

    tokenizer = CLIPTokenizer.from_open_clip()
    rngs = nnx.Rngs(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    text_encoder = CLIPTextTransformer(CLIPTextConfig(**small, projection_dim=None), rngs=rngs)
    unet = UNet2DConditionModel(UNetConfig(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8), rngs=rngs)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16),
                        rngs=rngs)
    sd = StableDiffusion(text_encoder, tokenizer, unet, vae, dict(SD14_SCHEDULER), scheduler=config.scheduler,
                         mesh=mesh)
    q16_vision = CLIPVisionTransformer(CLIPVisionConfig(image_size=28, patch_size=14, **small, projection_dim=768),
                                       rngs=rngs)
    clip = CLIPModel(CLIPConfig(text=CLIPTextConfig(**small, projection_dim=32),
                                vision=CLIPVisionConfig(image_size=32, patch_size=16, **small, projection_dim=32)),
                     rngs=rngs)
    if q16_prompts is None:
        q16_prompts = np.random.default_rng(seed).standard_normal((2, 768)).astype(np.float32)
    return PosiReward(sd, q16_vision, q16_prompts, clip, tokenizer, config, mesh=mesh)
