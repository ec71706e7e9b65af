"""LLaMA-family causal LM in Flax NNX (SmolLM2-135M, LLaMA-7B, ...), with a fixed-size KV cache and a value head.

Cache layout: k/v a tuple of one [B, Hkv, S, D] array per layer (not one stacked array: the attention then reads a
layer's keys where they lie, where a slice of a stacked array cost a copy of it per layer and decode step, 7% of a
batch-32 step); `valid` [B, S] marks slots that hold real tokens, so left-padded batches never attend to padding. A token in slot s may attend slot s' iff s' <= s and valid[s'].
Positions come from the caller (left padding: position = index among the row's real tokens).

New tokens go to the same slots in every row (a scalar `cache_offset`), or each row to its own (a [B] offset: the
speculative sampler, whose rows accept different numbers of draft tokens per step). Slots past a row's query are
masked by the causal rule, so stale entries there (rejected draft tokens) are never read before they are rewritten.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.nn.attention import dot_product_attention, xla_attention
from posi_jax.nn.linear import Linear
from posi_jax.nn.norms import RMSNorm
from posi_jax.nn.rope import apply_rope


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # default hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def smollm2_135m(cls) -> "LlamaConfig":
        return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
                   tie_word_embeddings=True)

    @classmethod
    def llama_7b(cls) -> "LlamaConfig":
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                   num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
                   tie_word_embeddings=False)


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D]: heads before slots, as the attention matmuls read them
    v: tuple[jax.Array, ...]
    valid: jax.Array  # [B, S] bool

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, config.num_kv_heads, size, config.head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)), jnp.zeros((batch, size), bool))

    def take_rows(self, order: jax.Array) -> "KVCache":
        return KVCache(tuple(a[order] for a in self.k), tuple(a[order] for a in self.v), self.valid[order])

    def place(self, k: jax.Array, v: jax.Array, start: jax.Array) -> "KVCache":
        """The same keys and values k, v [num_layers, Hkv, T, D] written to every row b's slots start[b] + [0, T)
        (marked valid)."""
        rows = jnp.arange(self.valid.shape[0])[:, None]
        slots = start[:, None] + jnp.arange(k.shape[2])

        def put(buffers, new):
            return tuple(a.at[rows, :, slots].set(jnp.moveaxis(x, 1, 0).astype(a.dtype)) for a, x in zip(buffers, new))

        return KVCache(put(self.k, k), put(self.v, v), self.valid.at[rows, slots].set(True))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Positions for a (left- or right-) padded batch: index of each token among its row's real tokens."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, h * hd, **lin)
        self.k_proj = Linear(d, hkv * hd, **lin)
        self.v_proj = Linear(d, hkv * hd, **lin)
        self.o_proj = Linear(h * hd, d, **lin)
        self.cfg = cfg

    def __call__(self, x, positions, mask, cache, layer, cache_offset):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        if cache is None:
            out = dot_product_attention(q, k, v, mask, implementation="xla")
        else:
            # Update layer `layer`'s [B, Hkv, S, D] buffers in place (a loop carry XLA can alias), then attend to them.
            ck, cv = cache.k[layer], cache.v[layer]
            if jnp.ndim(cache_offset) == 0:
                k, v = (a.transpose(0, 2, 1, 3).astype(ck.dtype) for a in (k, v))
                ck = jax.lax.dynamic_update_slice(ck, k, (0, 0, cache_offset, 0))
                cv = jax.lax.dynamic_update_slice(cv, v, (0, 0, cache_offset, 0))
            else:  # row b's T tokens to slots offset[b] + [0, T): a scatter of [B, T] rows of [Hkv, D]
                rows = jnp.arange(b)[:, None]
                slots = cache_offset[:, None] + jnp.arange(t)
                ck = ck.at[rows, :, slots].set(k.astype(ck.dtype), mode="drop")
                cv = cv.at[rows, :, slots].set(v.astype(cv.dtype), mode="drop")
            cache = cache._replace(k=_replaced(cache.k, layer, ck), v=_replaced(cache.v, layer, cv))
            out = xla_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, kv_heads_first=True)
        return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim)), cache


def _replaced(items: tuple, i: int, value) -> tuple:
    return items[:i] + (value,) + items[i + 1:]


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **lin)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, mask, cache, layer, cache_offset):
        h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, layer, cache_offset)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaForCausalLM(nnx.Module):
    """Decoder stack + LM head. `__call__` returns fp32 logits; `hidden_states` serves the value head."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def hidden_states(self, tokens, *, attention_mask=None, positions=None, cache: KVCache | None = None,
                      cache_offset=0):
        """Final-norm hidden states [B, T, D] (and the updated cache).

        Without a cache, `attention_mask` [B, T] marks real tokens. With a cache, the new tokens go to slots
        [cache_offset, cache_offset + T) (`cache_offset` a scalar, or [B]: one offset per row) and `attention_mask`
        marks which of them are real.
        """
        b, t = tokens.shape
        attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)
        if cache is None:
            key_valid = attention_mask
            q_slots = jnp.arange(t)
            k_slots = jnp.arange(t)
        elif jnp.ndim(cache_offset) == 0:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache_offset))
            q_slots = cache_offset + jnp.arange(t)
            k_slots = jnp.arange(cache.valid.shape[1])
        else:
            q_slots = cache_offset[:, None] + jnp.arange(t)  # [B, T]
            key_valid = cache.valid.at[jnp.arange(b)[:, None], q_slots].set(attention_mask, mode="drop")
            k_slots = jnp.arange(cache.valid.shape[1])
        causal = k_slots <= q_slots[..., None]  # [T, S], or [B, T, S] with per-row offsets
        mask = jnp.expand_dims(causal, -3) & key_valid[:, None, None, :]  # [B, 1, T, S]
        if cache is not None:
            cache = cache._replace(valid=key_valid)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, mask, cache, i, cache_offset)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            out = jnp.dot(hidden.astype(self.dtype), self.embed_tokens[...].astype(self.dtype).T)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, tokens, *, attention_mask=None, positions=None, cache=None, cache_offset=0):
        hidden, cache = self.hidden_states(tokens, attention_mask=attention_mask, positions=positions, cache=cache,
                                           cache_offset=cache_offset)
        return self.logits(hidden), cache


class ValueHead(nnx.Module):
    """Scalar value per token from the trunk's final hidden states (PPO's critic)."""

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.summary = Linear(hidden_size, 1, use_bias=True, param_dtype=param_dtype, rngs=rngs, init_std=0.0)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.summary(hidden.astype(jnp.float32))[..., 0]


class LlamaValueModel(nnx.Module):
    """Value model: a LLaMA trunk (initialised from the SFT weights) with a scalar head instead of the LM head."""

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.trunk = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.value_head = ValueHead(cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, tokens, *, attention_mask=None, positions=None):
        hidden, _ = self.trunk.hidden_states(tokens, attention_mask=attention_mask, positions=positions)
        return self.value_head(hidden)
