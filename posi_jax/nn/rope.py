"""Rotary position embeddings in the HF/LLaMA "rotate half" layout (not llama.cpp's interleaved one)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies, shape [head_dim // 2]."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate x [B, T, H, D] by integer positions [B, T]. Computed in fp32, returned in x.dtype."""
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
