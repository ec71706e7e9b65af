"""RMSNorm, LayerNorm and GroupNorm with fp32 statistics whatever the compute dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError


class RMSNorm(nnx.Module):
    """y = x / rms(x) * weight (LLaMA). Statistics in fp32; the result is cast to `dtype`."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm (CLIP, SD transformer blocks). Statistics in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over the channel (last) axis of NHWC or [B, S, C] tensors (SD UNet/VAE). Statistics in fp32."""

    def __init__(self, num_groups: int, channels: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if channels % num_groups:
            raise PosiError(f"GroupNorm: {channels} channels are not divisible into {num_groups} groups")
        self.weight = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        self.num_groups, self.eps = num_groups, eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        shape, c = x.shape, x.shape[-1]
        g = x.reshape(shape[0], -1, self.num_groups, c // self.num_groups).astype(jnp.float32)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        normed = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        out = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(self.dtype)
