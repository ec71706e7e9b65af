"""Attention implementations against a plain numpy softmax(QK^T)V, with grouped-query heads and masks with holes."""
import numpy as np
import pytest

import jax.numpy as jnp

import posi_jax.nn.attention as attention
from posi_jax.nn.attention import blockwise_attention, chunked_attention, dot_product_attention, xla_attention
from tests.conftest import max_abs


def numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, h, d = q.shape
    reps = h // k.shape[2]
    k, v = np.repeat(k, reps, axis=2), np.repeat(v, reps, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    if mask is not None:
        s = np.where(np.broadcast_to(mask, s.shape), s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(b=2, tq=8, tk=8, h=6, hkv=2, d=16, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((b, tq, h, d)).astype(np.float32), r.standard_normal((b, tk, hkv, d)).astype(np.float32),
            r.standard_normal((b, tk, hkv, d)).astype(np.float32))


@pytest.mark.parametrize("mask_kind", ["none", "causal_padded", "per_head"])
@pytest.mark.parametrize("hkv", [1, 2, 6])
def test_xla_attention_gqa_and_masks(mask_kind, hkv):
    q, k, v = _inputs(hkv=hkv)
    mask = None
    if mask_kind == "causal_padded":  # [B, 1, Tq, Tk]: causal, and the first two keys of row 1 are padding
        valid = np.ones((2, 8), bool)
        valid[1, :2] = False
        mask = np.tril(np.ones((8, 8), bool))[None, None] & valid[:, None, None, :]
    elif mask_kind == "per_head":  # [B, H, Tq, Tk] with holes that differ per head
        mask = np.random.default_rng(1).random((2, 6, 8, 8)) > 0.3
        mask[..., 0] = True
    ref = numpy_attention(q, k, v, mask)
    out = xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if mask is None else jnp.asarray(mask))
    assert max_abs(out, ref) < 1e-5
    # the KV-cache layout [B, Hkv, Tk, D] gives the same numbers
    kf, vf = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    out_f = xla_attention(jnp.asarray(q), jnp.asarray(kf), jnp.asarray(vf), None if mask is None else jnp.asarray(mask),
                          kv_heads_first=True)
    assert max_abs(out_f, ref) < 1e-5


def test_blockwise_matches_reference_with_mask():
    q, k, v = _inputs(tq=64, tk=96, hkv=3)
    mask = np.random.default_rng(2).random((2, 1, 64, 96)) > 0.2
    ref = numpy_attention(q, k, v, mask)
    out = blockwise_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), q_block=16, kv_block=32)
    assert max_abs(out, ref) < 1e-5


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_row"])
@pytest.mark.parametrize("max_scores", [1, 2 * 6 * 8 * 12, 10 ** 9])  # groups of 1 row, of 2 rows (of 6), all 6 rows
def test_chunked_matches_reference_per_group(mask_kind, max_scores):
    q, k, v = _inputs(b=6, tq=8, tk=12, hkv=2)
    mask = None
    if mask_kind == "shared":  # [1, 1, Tq, Tk]: one mask closed over by every group
        mask = np.random.default_rng(3).random((1, 1, 8, 12)) > 0.3
    elif mask_kind == "per_row":  # [B, H, Tq, Tk]: each group must get its own rows of the mask
        mask = np.random.default_rng(4).random((6, 6, 8, 12)) > 0.3
    if mask is not None:
        mask[..., 0] = True
    ref = numpy_attention(q, k, v, mask)
    out = chunked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                            None if mask is None else jnp.asarray(mask), max_scores=max_scores)
    assert max_abs(out, ref) < 1e-5


def test_auto_picks_chunked_for_large_batched_scores_on_cpu(monkeypatch):
    q, k, v = _inputs(b=4, tq=8, tk=8, hkv=6)
    calls = []
    monkeypatch.setattr(attention, "chunked_attention", lambda *a, **kw: calls.append(1) or xla_attention(*a, **kw))
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 4 * 6 * 8 * 8 - 1)  # the whole batch's scores exceed it
    dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert calls == [1]
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 4 * 6 * 8 * 8)  # they fit: plain xla
    dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert calls == [1]


def test_fully_masked_row_is_finite_not_nan():
    q, k, v = _inputs()
    mask = np.ones((2, 1, 8, 8), bool)
    mask[0, 0, 3] = False
    out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                           implementation="xla"))
    assert np.isfinite(out).all()


def test_unknown_implementation_is_an_error():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, implementation="fast")
