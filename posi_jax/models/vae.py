"""Stable Diffusion's AutoencoderKL (encoder and decoder) in Flax NNX, NHWC.

Parameter names follow diffusers (`decoder.up_blocks.0.resnets.1.conv2`, `decoder.mid_block.attentions.0.to_q` ...)
with `downsamplers.0` / `upsamplers.0` -> `downsampler` / `upsampler` and `to_out.0` -> `to_out` (mapped in
`posi_jax/weights/sd.py`). The ResNet block, attention and resampling layers are the UNet's (posi_jax/models/unet.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.unet import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from posi_jax.nn.conv import Conv2d
from posi_jax.nn.linear import Linear
from posi_jax.nn.norms import GroupNorm

_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code this GroupNorm epsilon
_FIXED_OPTIONS = {
    "act_fn": ("silu",), "down_block_types": (["DownEncoderBlock2D"],), "up_block_types": (["UpDecoderBlock2D"],),
    "shift_factor": (None, 0.0), "latents_mean": (None,), "latents_std": (None,),
}
# force_upcast only tells fp16 pipelines to run the VAE in fp32; it changes nothing in this forward pass.
_IGNORED_OPTIONS = ("force_upcast",)


@dataclass(frozen=True)
class VAEConfig:
    """Fields named as in diffusers' vae/config.json; defaults are SD v1.x's."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512  # the image size it was trained at (diffusers: tiling); informational here
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict, source: str = "vae config") -> "VAEConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_OPTIONS:
                continue
            if key in _FIXED_OPTIONS:
                allowed = _FIXED_OPTIONS[key]
                if key.endswith("block_types"):  # one entry per block, all of the one supported type
                    ok = isinstance(value, (list, tuple)) and len(value) == n and set(value) == set(allowed[0])
                else:
                    ok = value in allowed
                if not ok:
                    raise PosiError(f"{source}: unsupported AutoencoderKL option {key}={value!r}")
                continue
            if key not in fields:
                raise PosiError(f"{source}: unknown AutoencoderKL config key {key!r}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


class VAEAttention(Attention):
    """The VAE mid-block's single-head self-attention over H*W pixels, with its own GroupNorm and residual."""

    def __init__(self, channels: int, groups: int, *, dtype, param_dtype, rngs):
        super().__init__(channels, 1, channels, qkv_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(groups, channels, eps=_EPS, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        b, h, w, c = x.shape
        out = super().__call__(self.group_norm(x).reshape(b, h * w, c))
        return out.reshape(b, h, w, c) + x.astype(out.dtype)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, groups=groups, eps=_EPS, **kw)
                                 for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(channels, groups, **kw)]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class ResampleBlock(nnx.Module):
    """DownEncoderBlock2D (resnets then a stride-2 conv) or UpDecoderBlock2D (resnets then nearest x2 + conv)."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, resample: str | None, *, dtype,
                 param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups=groups, eps=_EPS,
                                               **kw) for j in range(num_layers)])
        self.downsampler = Downsample2D(out_ch, 0, **kw) if resample == "down" else None
        self.upsampler = Upsample2D(out_ch, **kw) if resample == "up" else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        if self.upsampler is not None:
            x = self.upsampler(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            ResampleBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < n - 1 else None, **kw)
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev, n, g = tuple(reversed(cfg.block_out_channels)), len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            ResampleBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None, **kw)
            for i in range(n)])
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = Linear(2 * lat, 2 * lat, use_bias=True, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = Linear(lat, lat, use_bias=True, **kw) if cfg.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels], logvar clipped to
        [-30, 20] as diffusers' DiagonalGaussianDistribution. Latents for the UNet are mean * scaling_factor."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents [B, h, w, latent_channels], already divided by scaling_factor -> images [B, H, W, 3] ~[-1, 1]."""
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return self.decoder(z)
