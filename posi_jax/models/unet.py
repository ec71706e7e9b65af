"""Stable Diffusion's UNet2DConditionModel (SD v1.x and v2.x) in Flax NNX, NHWC.

Module and parameter names follow diffusers (`down_blocks.0.resnets.1.conv1`, `attentions.0.transformer_blocks.0.
attn2.to_k` ...) with three simplifications that `posi_jax/weights/sd.py` maps: `to_out.0` -> `to_out`,
`ff.net.0.proj` / `ff.net.2` -> `ff.proj` / `ff.out`, `downsamplers.0` / `upsamplers.0` -> `downsampler` / `upsampler`.
1x1 convolutions (conv_shortcut, conv proj_in/proj_out) are Linear layers over the channel axis: the same math in
NHWC, and one parameter layout for SD v1's conv projection and SD v2's linear projection.

`attention_head_dim` keeps diffusers' SD meaning: it is the NUMBER OF HEADS per block (diffusers issue #2011), an int
for every block or one value per down block (SD v2: [5, 10, 20, 20]); the head width is channels // heads.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.nn.attention import dot_product_attention
from posi_jax.nn.conv import Conv2d
from posi_jax.nn.linear import Linear
from posi_jax.nn.norms import GroupNorm, LayerNorm

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config options we accept only at the value SD v1/v2 use (anything else is a different architecture).
_FIXED_OPTIONS = {
    "act_fn": ("silu",), "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,),
    "dual_cross_attention": (False,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "addition_time_embed_dim": (None,), "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),  # diffusers itself rejects it for this class (the naming issue above)
}
# Options that do not change the forward pass here: dropout (inference only), upcast_attention (our attention always
# computes scores and softmax in fp32), addition_embed_type_num_heads (only read with addition embeddings), and
# use_linear_projection (SD v2's linear proj_in/proj_out and SD v1's 1x1 convs are the same map over channels in NHWC;
# the weight table accepts both tensor layouts).
_IGNORED_OPTIONS = ("dropout", "upcast_attention", "addition_embed_type_num_heads", "use_linear_projection")


@dataclass(frozen=True)
class UNetConfig:
    """Fields named as in diffusers' unet/config.json; defaults are SD v1.4's."""
    sample_size: int = 64  # default latent height/width (pipelines: image size = sample_size * VAE scale factor)
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # = heads per block (see the module docstring)
    resnet_out_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.down_block_types)
        bad = [t for t in self.down_block_types if t not in _DOWN_TYPES] + [
            t for t in self.up_block_types if t not in _UP_TYPES]
        if bad:
            raise PosiError(f"UNetConfig: unsupported block type {bad[0]!r} (supported: {_DOWN_TYPES + _UP_TYPES})")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise PosiError(f"UNetConfig: down_block_types, up_block_types and block_out_channels must have the same "
                            f"length ({n}, {len(self.up_block_types)}, {len(self.block_out_channels)})")
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            v = getattr(self, name)
            if not isinstance(v, int) and len(v) != n:
                raise PosiError(f"UNetConfig: {name} has {len(v)} entries for {n} down blocks")
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads_per_block)):
            if c % h:
                raise PosiError(f"UNetConfig: block {i} has {c} channels, not divisible by {h} attention heads")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise PosiError("UNetConfig: conv_in_kernel and conv_out_kernel must be odd")

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        h = self.attention_head_dim
        return (h,) * len(self.down_block_types) if isinstance(h, int) else tuple(h)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        t = self.transformer_layers_per_block
        return (t,) * len(self.down_block_types) if isinstance(t, int) else tuple(t)

    @classmethod
    def from_diffusers(cls, config: dict, source: str = "unet config") -> "UNetConfig":
        """From a diffusers unet/config.json dict: unknown keys and unsupported option values are PosiErrors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_OPTIONS:
                continue
            if key in _FIXED_OPTIONS:
                if value not in _FIXED_OPTIONS[key]:
                    raise PosiError(f"{source}: unsupported UNet option {key}={value!r} "
                                    f"(supported: {', '.join(map(repr, _FIXED_OPTIONS[key]))})")
                continue
            if key not in fields:
                raise PosiError(f"{source}: unknown UNet config key {key!r}")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [B, dim] in fp32, as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between, 1x1 shortcut when channels change (UNet and VAE)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, *, groups: int, eps: float,
                 output_scale_factor: float = 1.0, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_ch, eps=eps, **kw)
        self.conv1 = Conv2d(in_ch, out_ch, 3, rngs=rngs, **kw)
        self.time_emb_proj = Linear(temb_ch, out_ch, use_bias=True, rngs=rngs, **kw) if temb_ch else None
        self.norm2 = GroupNorm(groups, out_ch, eps=eps, **kw)
        self.conv2 = Conv2d(out_ch, out_ch, 3, rngs=rngs, **kw)
        self.conv_shortcut = Linear(in_ch, out_ch, use_bias=True, rngs=rngs, **kw) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip.astype(h.dtype) + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Attention(nnx.Module):
    """Multi-head attention over [B, S, C] with separate q/k/v projections (diffusers' `Attention`)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, *,
                 qkv_bias: bool = False, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner, context_dim = heads * head_dim, context_dim or query_dim
        self.to_q = Linear(query_dim, inner, use_bias=qkv_bias, **kw)
        self.to_k = Linear(context_dim, inner, use_bias=qkv_bias, **kw)
        self.to_v = Linear(context_dim, inner, use_bias=qkv_bias, **kw)
        self.to_out = Linear(inner, query_dim, use_bias=True, **kw)
        self.heads, self.head_dim = heads, head_dim

    def __call__(self, x, context=None):
        context = x if context is None else context
        b, s, _ = x.shape
        q = self.to_q(x).reshape(b, s, self.heads, self.head_dim)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, self.head_dim)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, self.head_dim)
        out = dot_product_attention(q, k, v)
        return self.to_out(out.reshape(b, s, self.heads * self.head_dim))


class GEGLUFeedForward(nnx.Module):
    """proj -> (h, gate) halves -> h * gelu(gate) (exact erf GELU) -> out."""

    def __init__(self, dim: int, mult: int = 4, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(dim, 2 * mult * dim, use_bias=True, **kw)
        self.out = Linear(mult * dim, dim, use_bias=True, **kw)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(h * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, eps=1e-5, **kw)
        self.attn1 = Attention(dim, heads, head_dim, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, eps=1e-5, **kw)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, rngs=rngs, **kw)
        self.norm3 = LayerNorm(dim, eps=1e-5, **kw)
        self.ff = GEGLUFeedForward(dim, rngs=rngs, **kw)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the residual.
    SD v1's 1x1-conv projections and SD v2's linear ones are the same map over channels in NHWC; they differ only in
    whether the projection comes before or after flattening, which does not change the numbers."""

    def __init__(self, channels: int, heads: int, context_dim: int, num_layers: int, *, groups: int, dtype,
                 param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(groups, channels, eps=1e-6, **kw)
        self.proj_in = Linear(channels, channels, use_bias=True, rngs=rngs, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, rngs=rngs, **kw)
            for _ in range(num_layers)])
        self.proj_out = Linear(channels, channels, use_bias=True, rngs=rngs, **kw)

    def __call__(self, x, context):
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(tokens).reshape(b, h, w, c) + x.astype(tokens.dtype)


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv; padding 0 means diffusers' VAE variant (pad right/bottom by one, then no padding)."""

    def __init__(self, channels: int, padding: int, *, dtype, param_dtype, rngs):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.pad_right = padding == 0

    def __call__(self, x):
        if self.pad_right:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class DownBlock(nnx.Module):
    """CrossAttnDownBlock2D (with attentions) or DownBlock2D; returns the output and the skip tensors."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, temb_ch: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out_ch = cfg.block_out_channels[i]
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch, groups=cfg.norm_num_groups,
                          eps=cfg.norm_eps, output_scale_factor=cfg.resnet_out_scale_factor, **kw)
            for j in range(cfg.layers_per_block)])
        self.attentions = nnx.List([
            Transformer2DModel(out_ch, cfg.heads_per_block[i], cfg.cross_attention_dim, cfg.transformer_layers[i],
                               groups=cfg.norm_num_groups, **kw)
            for _ in range(cfg.layers_per_block)]) if cfg.down_block_types[i] == "CrossAttnDownBlock2D" else None
        last = i == len(cfg.down_block_types) - 1
        self.downsampler = None if last else Downsample2D(out_ch, cfg.downsample_padding, **kw)

    def __call__(self, x, temb, context):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, skips


class MidBlockCrossAttn(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig, temb_ch: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels[-1]
        res = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb_ch, **res, **kw) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(ch, cfg.heads_per_block[-1], cfg.cross_attention_dim,
                                                       cfg.transformer_layers[-1], groups=cfg.norm_num_groups, **kw)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nnx.Module):
    """CrossAttnUpBlock2D or UpBlock2D: layers_per_block + 1 resnets, each fed the next skip tensor (concatenated)."""

    def __init__(self, cfg: UNetConfig, i: int, prev_out_ch: int, temb_ch: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = tuple(reversed(cfg.block_out_channels))
        out_ch, in_ch = rev[i], rev[min(i + 1, len(rev) - 1)]
        n = cfg.layers_per_block + 1
        self.resnets = nnx.List([
            ResnetBlock2D((prev_out_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch, temb_ch,
                          groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                          output_scale_factor=cfg.resnet_out_scale_factor, **kw)
            for j in range(n)])
        heads = tuple(reversed(cfg.heads_per_block))[i]
        layers = tuple(reversed(cfg.transformer_layers))[i]
        self.attentions = nnx.List([
            Transformer2DModel(out_ch, heads, cfg.cross_attention_dim, layers, groups=cfg.norm_num_groups, **kw)
            for _ in range(n)]) if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else None
        self.upsampler = None if i == len(rev) - 1 else Upsample2D(out_ch, **kw)

    def __call__(self, x, skips, temb, context):
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        return x if self.upsampler is None else self.upsampler(x)


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, dim: int, *, dtype, param_dtype, rngs):
        self.linear_1 = Linear(in_dim, dim, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNet2DConditionModel(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype = cfg, dtype
        ch0 = cfg.block_out_channels[0]
        temb_ch = 4 * ch0
        self.conv_in = Conv2d(cfg.in_channels, ch0, cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(ch0, temb_ch, **kw)
        self.down_blocks = nnx.List([])
        out_ch = ch0
        for i in range(len(cfg.down_block_types)):
            in_ch, out_ch = out_ch, cfg.block_out_channels[i]
            self.down_blocks.append(DownBlock(cfg, i, in_ch, temb_ch, **kw))
        self.mid_block = MidBlockCrossAttn(cfg, temb_ch, **kw)
        self.up_blocks = nnx.List([])
        prev = cfg.block_out_channels[-1]
        for i in range(len(cfg.up_block_types)):
            self.up_blocks.append(UpBlock(cfg, i, prev, temb_ch, **kw))
            prev = tuple(reversed(cfg.block_out_channels))[i]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch0, eps=cfg.norm_eps, dtype=dtype,
                                       param_dtype=param_dtype)
        self.conv_out = Conv2d(ch0, cfg.out_channels, cfg.conv_out_kernel, **kw)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        """sample [B, h, w, C_in], timesteps [B] or scalar (int or float), encoder_hidden_states [B, S, D]."""
        cfg = self.cfg
        b, h, w, _ = sample.shape
        factor = 2 ** (len(cfg.down_block_types) - 1)
        if h % factor or w % factor:
            raise PosiError(f"UNet: latent size {h}x{w} is not a multiple of {factor} (one per downsampling)")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
