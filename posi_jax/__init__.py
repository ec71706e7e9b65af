"""posi_jax: POSI, the universal prompt optimizer for safe text-to-image generation, in pure JAX / Flax NNX.

Public API (imported lazily so `import posi_jax` stays cheap):
    Rewriter            toxic → clean prompt rewriting with a LLaMA-family policy
    StableDiffusion     text → image with a local diffusers Stable Diffusion folder (jitted, shardable)
    sample_images       the pure, jittable denoising loop + VAE decode behind it
    PosiReward          the POSI reward (SD images -> Q16 + CLIP score) as one jitted function; RewardConfig
    PPOTrainer          PPO against any `(rewritten, original) -> scores` reward
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Rewriter": ("posi_jax.policy.rewriter", "Rewriter"),
    "StableDiffusion": ("posi_jax.diffusion.pipeline", "StableDiffusion"),
    "sample_images": ("posi_jax.diffusion.pipeline", "sample_images"),
    "PosiReward": ("posi_jax.reward.posi", "PosiReward"),
    "RewardConfig": ("posi_jax.reward.posi", "RewardConfig"),
    "PPOTrainer": ("posi_jax.rl.trainer", "PPOTrainer"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'posi_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
