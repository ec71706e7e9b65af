"""Scaled dot-product attention shared by the LLaMA, CLIP and UNet models.

Layout: q [B, Tq, H, D], k/v [B, Tk, Hkv, D] with H a multiple of Hkv (grouped-query attention).
`mask` is boolean, broadcastable to [B, H, Tq, Tk] (True = may attend). Softmax runs in fp32.

Implementations:
  "xla"        materialises the [B, H, Tq, Tk] scores: best for short sequences (LM decode, CLIP, cross-attention).
  "blockwise"  online softmax over key blocks (flash-style), query blocks scanned too: on CPU the materialised
               scores of SD's 4096-token self-attention fall out of cache, and the exp over them dominates.
  "chunked"    "xla" one group of batch rows at a time (a loop over groups), each group's scores at most
               `_CHUNK_SCORES` elements: on CPU, 8 images x 16 heads of ViT-L/14's 257-token scores (34 MB) ran
               at half the per-score speed of 2 images at a time.
  "cudnn"      jax.nn.dot_product_attention's fused GPU kernel.
  "auto"       on CPU: blockwise for long key sequences, chunked where the scores of the whole batch are large,
               else xla; on GPU: cudnn where it applies, else xla.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite, so a fully-masked row stays finite (no NaN from exp(-inf - -inf))
_CHUNK_SCORES = 1 << 21  # scores per group in "chunked" (8 MiB of fp32), about where XLA:CPU's per-score cost jumps


def _expand_kv(k: jax.Array, num_heads: int) -> jax.Array:
    reps = num_heads // k.shape[2]
    return k if reps == 1 else jnp.repeat(k, reps, axis=2)


def _group_mask(mask, num_kv_heads: int, groups: int):
    """A mask broadcastable to [B, H, Tq, Tk] as one broadcastable to [B, Hkv, G, Tq, Tk]."""
    if mask.ndim < 4 or mask.shape[1] == 1:
        return mask[..., None, :, :] if mask.ndim >= 3 else mask
    return mask.reshape(mask.shape[0], num_kv_heads, groups, *mask.shape[2:])


def xla_attention(q, k, v, mask=None, scale=None, *, kv_heads_first: bool = False):
    """Materialised-scores attention. Grouped-query heads are handled by folding each KV head's G query heads into
    the query-row axis ([B, Hkv, G*Tq, D]) rather than repeating k/v (which would copy the whole cache every decode
    step); both matmuls are then plain batched matmuls over (B, Hkv), the layout the CPU GEMM kernels want.
    `kv_heads_first`: k/v are laid out [B, Hkv, Tk, D] (the KV cache's layout, read without a transpose)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, tq, h, d = q.shape
    if not kv_heads_first:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, tq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * tq, d)
    scores = jnp.einsum("bhqd,bhkd->bhqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        m = jnp.broadcast_to(_group_mask(mask, hkv, g), (b, hkv, g, tq, tk)).reshape(b, hkv, g * tq, tk)
        scores = jnp.where(m, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hkv, g, tq, d).transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d).astype(q.dtype)


def blockwise_attention(q, k, v, mask=None, scale=None, q_block: int = 1024, kv_block: int = 1024):
    """Flash-style attention: one (batch, head, query block) at a time, an online softmax over its key blocks, so
    the live scores are one [q_block, kv_block] tile of one head: plain 2-D matmuls, and a working set that tiles
    spanning every batch row and head at once (16x larger at SD's 8 heads x CFG batch 2) did not have."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, tq, h, d = q.shape
    tk = k.shape[1]
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    q_block, kv_block = min(q_block, tq), min(kv_block, tk)
    if tq % q_block or tk % kv_block:  # ragged lengths: not worth the padding logic here
        return xla_attention(q, k, v, mask, scale)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, tq, tk))
    nq, nk = tq // q_block, tk // kv_block
    qb = (q * scale).transpose(0, 2, 1, 3).reshape(b * h * nq, q_block, d)  # tiles ordered (batch, head, block)
    kb = k.transpose(0, 2, 1, 3).reshape(b * h, nk, kv_block, d)
    vb = v.transpose(0, 2, 1, 3).reshape(b * h, nk, kv_block, d)

    def one_tile(tile, q_chunk):
        bh, qi = tile // nq, tile % nq

        def step(carry, ki):
            acc, row_max, row_sum = carry
            k_chunk, v_chunk = kb[bh, ki], vb[bh, ki]
            s = jnp.dot(q_chunk, k_chunk.T, preferred_element_type=jnp.float32)
            if mask is not None:
                m = jax.lax.dynamic_slice(mask, (bh // h, bh % h, qi * q_block, ki * kv_block),
                                          (1, 1, q_block, kv_block))[0, 0]
                s = jnp.where(m, s, _NEG_INF)
            new_max = jnp.maximum(row_max, s.max(-1))
            p = jnp.exp(s - new_max[:, None])
            correction = jnp.exp(row_max - new_max)
            row_sum = row_sum * correction + p.sum(-1)
            acc = acc * correction[:, None] + jnp.dot(p.astype(v_chunk.dtype), v_chunk,
                                                      preferred_element_type=jnp.float32)
            return (acc, new_max, row_sum), None

        init = (jnp.zeros((q_block, d), jnp.float32), jnp.full((q_block,), _NEG_INF, jnp.float32),
                jnp.zeros((q_block,), jnp.float32))
        (acc, _, row_sum), _ = jax.lax.scan(step, init, jnp.arange(nk))
        return acc / jnp.maximum(row_sum, 1e-30)[:, None]

    out = jax.lax.map(lambda args: one_tile(*args), (jnp.arange(b * h * nq), qb))  # [B*H*nq, q_block, D]
    return out.reshape(b, h, tq, d).transpose(0, 2, 1, 3).astype(q.dtype)


def chunked_attention(q, k, v, mask=None, scale=None, max_scores: int = _CHUNK_SCORES):
    """`xla_attention` over groups of batch rows, one group at a time (`lax.map`), the group the largest divisor
    of B whose scores [g, H, Tq, Tk] hold at most `max_scores` elements (at least one row)."""
    b, tq, h, _ = q.shape
    per_row = h * tq * k.shape[1]
    g = max([d for d in range(1, b + 1) if b % d == 0 and d * per_row <= max_scores] or [1])
    if g == b:
        return xla_attention(q, k, v, mask, scale)
    groups = lambda a: a.reshape(b // g, g, *a.shape[1:])  # noqa: E731
    if mask is None or mask.ndim < 4 or mask.shape[0] == 1:  # shared by every row: closed over, not split
        out = jax.lax.map(lambda qkv: xla_attention(*qkv, mask, scale), (groups(q), groups(k), groups(v)))
    else:
        out = jax.lax.map(lambda qkvm: xla_attention(*qkvm, scale), (groups(q), groups(k), groups(v), groups(mask)))
    return out.reshape(q.shape)


def dot_product_attention(q, k, v, mask=None, *, scale=None, implementation: str = "auto"):
    """q [B, Tq, H, D], k/v [B, Tk, Hkv, D]; see the module docstring for `implementation`."""
    if implementation == "auto":
        platform = jax.devices()[0].platform
        if platform == "gpu" and q.dtype in (jnp.float16, jnp.bfloat16) and mask is None:
            implementation = "cudnn"
        elif platform == "cpu" and k.shape[1] >= 1024:
            implementation = "blockwise"
        elif platform == "cpu" and q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] > _CHUNK_SCORES:
            implementation = "chunked"
        else:
            implementation = "xla"
    if implementation == "xla":
        return xla_attention(q, k, v, mask, scale)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, mask, scale)
    if implementation == "chunked":
        return chunked_attention(q, k, v, mask, scale)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r} (xla, blockwise, chunked, cudnn, auto)")
