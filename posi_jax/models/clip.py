"""CLIP in Flax NNX: the text tower (also Stable Diffusion's text encoder) and the ViT vision tower.

One pre-LN transformer (`CLIPEncoder`) serves both towers. Parameter names follow HF `CLIPModel`
(`self_attn.q_proj`, `layer_norm1`, `mlp.fc1`, `pre_layrnorm` ...); every checkpoint layout (HF, OpenAI/open_clip)
is mapped onto them in `posi_jax/weights/clip.py`. Images enter the vision tower NHWC, already preprocessed
(`posi_jax/reward/preprocess.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.nn.attention import dot_product_attention
from posi_jax.nn.linear import Linear
from posi_jax.nn.norms import LayerNorm

_ACTIVATIONS = ("quick_gelu", "gelu")


def _check_common(cfg, what: str) -> None:
    if cfg.hidden_act not in _ACTIVATIONS:
        raise PosiError(f"{what}: hidden_act {cfg.hidden_act!r} is not supported (one of {', '.join(_ACTIVATIONS)})")
    if cfg.hidden_size % cfg.num_heads:
        raise PosiError(f"{what}: hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512  # None: no text_projection (HF CLIPTextModel, SD's text encoder)
    # None: pool at argmax(ids) (OpenAI vocab: EOT has the largest id); else the first position holding this id.
    eos_token_id: int | None = None
    # Number of final layers NOT run (their weights are still loaded): 1 gives SD v2's "penultimate" output.
    # The final LayerNorm is applied to whichever layer's output is used, as diffusers' clip_skip and LDM do.
    skip_last_layers: int = 0

    def __post_init__(self):
        _check_common(self, "CLIPTextConfig")
        if not 0 <= self.skip_last_layers < self.num_layers:
            raise PosiError(
                f"CLIPTextConfig: skip_last_layers {self.skip_last_layers} must be in [0, num_layers={self.num_layers})"
            )


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512

    def __post_init__(self):
        _check_common(self, "CLIPVisionConfig")
        if self.image_size % self.patch_size:
            raise PosiError(f"CLIPVisionConfig: image_size {self.image_size} not a multiple of patch {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    logit_scale_init: float = 2.6592  # log(1/0.07), CLIP's initial temperature

    def __post_init__(self):
        if self.text.projection_dim is None or self.text.projection_dim != self.vision.projection_dim:
            raise PosiError(
                f"CLIPConfig: text projection_dim {self.text.projection_dim} and vision projection_dim "
                f"{self.vision.projection_dim} must be equal and set"
            )


# ---- presets (OpenAI CLIP uses quick_gelu; open_clip's LAION models use gelu) -------------------------------------
CLIP_VIT_B32 = CLIPConfig(
    text=CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8, projection_dim=512),
    vision=CLIPVisionConfig(patch_size=32, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                            projection_dim=512),
)
CLIP_VIT_L14 = CLIPConfig(
    text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, projection_dim=768),
    vision=CLIPVisionConfig(patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                            projection_dim=768),
)
# SD v1.x text encoder: the ViT-L/14 text tower without projection.
SD1_TEXT_ENCODER = dataclasses.replace(CLIP_VIT_L14.text, projection_dim=None)
# SD v2.x text encoder: OpenCLIP ViT-H/14 text tower (open_clip layout, 24 layers), penultimate layer output.
# (diffusers' SD2 `text_encoder/` already stores only 23 layers with skip 0; load that one from its config.json.)
SD2_OPENCLIP_VIT_H_TEXT = CLIPTextConfig(
    hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, hidden_act="gelu", projection_dim=None,
    skip_last_layers=1,
)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() / HF "gelu" are the exact erf form


class CLIPAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(dim, dim, **kw)
        self.k_proj = Linear(dim, dim, **kw)
        self.v_proj = Linear(dim, dim, **kw)
        self.out_proj = Linear(dim, dim, **kw)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        out = dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        # activation in fp32 (sigmoid / erf), matmuls in the compute dtype
        h = _activation(self.act, self.fc1(x).astype(jnp.float32)).astype(x.dtype)
        return self.fc2(h)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads, rngs=rngs, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The pre-LN transformer shared by the text tower, the vision tower and SD's text encoder."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, num_layers: int | None = None) -> jax.Array:
        # A Python loop over (at most 32) layers, not over tokens or steps: unrolled once at trace time.
        for layer in self.layers[: len(self.layers) if num_layers is None else num_layers]:
            x = layer(x, mask)
        return x


def _normal(rngs: nnx.Rngs, shape, std: float, param_dtype) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(param_dtype))


class CLIPTextTransformer(nnx.Module):
    """Causal text tower: token + learned position embeddings, pre-LN layers, final LayerNorm, EOS pooling."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.token_embedding = _normal(rngs, (cfg.vocab_size, cfg.hidden_size), 0.02, param_dtype)
        self.position_embedding = _normal(rngs, (cfg.max_positions, cfg.hidden_size), 0.01, param_dtype)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype,
                                          param_dtype=param_dtype)
        if cfg.projection_dim is not None:
            self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, use_bias=False, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
        else:
            self.text_projection = None

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """input_ids int[B, T] (T <= max_positions) -> (last_hidden_state [B, T, D] after final LN, pooled [B, D])."""
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_positions:
            raise PosiError(f"CLIP text: {t} tokens exceed max_positions {cfg.max_positions}")
        x = self.token_embedding[...][input_ids] + self.position_embedding[...][:t]
        x = x.astype(self.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        x = self.encoder(x, causal, num_layers=cfg.num_layers - cfg.skip_last_layers)
        x = self.final_layer_norm(x)
        if cfg.eos_token_id is None:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return x, pooled

    def encode(self, input_ids: jax.Array) -> jax.Array:
        """Projected (unnormalised) text embeddings [B, projection_dim], as open_clip's encode_text."""
        if self.text_projection is None:
            raise PosiError("CLIP text tower has no text_projection (projection_dim is None)")
        return self.text_projection(self(input_ids)[1])


class CLIPVisionTransformer(nnx.Module):
    """ViT: patch embedding (conv as a matmul over patches), class token, learned positions, pre-LN
    (`pre_layrnorm`, HF's spelling), encoder, post-LN on the class token, projection."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        d, p = cfg.hidden_size, cfg.patch_size
        # kernel in conv HWIO layout [p, p, C, D]
        self.patch_embedding = _normal(rngs, (p, p, cfg.num_channels, d), (p * p * cfg.num_channels) ** -0.5,
                                       param_dtype)
        self.class_embedding = _normal(rngs, (d,), d ** -0.5, param_dtype)
        self.position_embedding = _normal(rngs, (cfg.num_patches + 1, d), d ** -0.5, param_dtype)
        kw = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.pre_layrnorm = LayerNorm(d, **kw)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(d, **kw)
        if cfg.projection_dim is not None:
            self.visual_projection = Linear(d, cfg.projection_dim, use_bias=False, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
        else:
            self.visual_projection = None

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values [N, S, S, C] normalised -> (last_hidden_state [N, 1+P, D] before post-LN, pooled [N, D])."""
        cfg = self.config
        s, p, c = cfg.image_size, cfg.patch_size, cfg.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s, s, c):
            raise PosiError(f"CLIP vision: expected images [N, {s}, {s}, {c}], got {tuple(pixel_values.shape)}")
        n, g = pixel_values.shape[0], s // p
        patches = pixel_values.astype(self.dtype).reshape(n, g, p, g, p, c)
        x = jnp.einsum("nyhxwc,hwcd->nyxd", patches, self.patch_embedding[...].astype(self.dtype),
                       preferred_element_type=jnp.float32).reshape(n, g * g, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(jnp.float32)
        x = self.pre_layrnorm(x)
        x = self.encoder(x.astype(self.dtype))
        return x, self.post_layernorm(x[:, 0])

    def encode(self, pixel_values: jax.Array) -> jax.Array:
        """Projected (unnormalised) image embeddings [N, projection_dim], as open_clip's encode_image."""
        if self.visual_projection is None:
            raise PosiError("CLIP vision tower has no visual_projection (projection_dim is None)")
        return self.visual_projection(self(pixel_values)[1])


class CLIPModel(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, param_dtype))

    def encode_text(self, input_ids: jax.Array) -> jax.Array:
        return self.text_model.encode(input_ids)

    def encode_image(self, pixel_values: jax.Array) -> jax.Array:
        return self.vision_model.encode(pixel_values)


def normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    """L2-normalise the last axis in fp32 (CLIP embeddings before a cosine)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps or jnp.finfo(jnp.float32).tiny)
