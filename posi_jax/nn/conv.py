"""2-D convolution on NHWC tensors with an HWIO kernel (checkpoint tables transpose torch's OIHW)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# On CPU, XLA's direct convolution is slow for small images with many channels (SD's 16x16 and 8x8 UNet levels at
# 1280 channels: measured ~2x slower there than one im2col matmul); above this many pixels the direct one is faster.
_CPU_IM2COL_MAX_PIXELS = 256


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] -> [B, H', W', Cout] (zero padding, torch semantics)."""
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    if (stride == 1 and kh * kw > 1 and h * w <= _CPU_IM2COL_MAX_PIXELS
            and jax.devices()[0].platform == "cpu"):
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
        cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
        return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout))
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(stride, stride),
                                        padding=((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2d(nnx.Module):
    """y = conv(x, kernel) + bias, stride `stride`, symmetric zero padding `padding` (torch's Conv2d semantics)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        fan_in = in_channels * kernel_size * kernel_size
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels),
                                                  param_dtype) / jnp.sqrt(fan_in).astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype)) if use_bias else None
        self.stride = stride
        self.padding = (kernel_size - 1) // 2 if padding is None else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
