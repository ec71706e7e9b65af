"""HashDropout: keep rate, independence between neighbours and between keys, determinism, nnx train/eval behaviour.

Statistical checks use 5-sigma bounds of the binomial counts, so a correct generator fails them with probability
below 1e-6, while a biased threshold (e.g. 8-bit resolution: 0.0977 instead of 0.1) or a mask that repeats along an
axis fails them by tens of sigmas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posi_jax.nn.dropout import HashDropout, keep_mask


def _within(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate_and_neighbour_independence(rate):
    keep = np.asarray(keep_mask(jax.random.key(3), (1000, 1000), rate))
    q = 1.0 - rate
    assert _within(keep.sum(), keep.size, q), keep.mean()
    # Neighbours along the minor axis, along the major axis (stride 1000) and 4096 apart: both kept with prob q².
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:]), (keep.reshape(-1)[:-4096], keep.reshape(-1)[4096:])):
        assert _within(np.sum(a & b), a.size, q * q), (np.mean(a & b), q * q)


def test_keys_give_independent_masks_and_a_key_gives_one_mask():
    shape, rate = (512, 576), 0.1
    k1, k2 = jax.random.split(jax.random.key(0))
    m1, m1_again, m2 = (np.asarray(keep_mask(k, shape, rate)) for k in (k1, k1, k2))
    assert np.array_equal(m1, m1_again)
    q = 1 - rate
    assert _within(np.sum(m1 & m2), m1.size, q * q)
    # Keys that differ in one counter step (consecutive fold_in values) are unrelated too.
    base = jax.random.key(7)
    a, b = (np.asarray(keep_mask(jax.random.fold_in(base, i), shape, rate)) for i in (0, 1))
    assert _within(np.sum(~a & ~b), a.size, rate * rate)


def test_hash_dropout_module_train_and_eval():
    drop = HashDropout(0.25, rngs=nnx.Rngs(dropout=0))
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (64, 300)).astype(np.float32))
    y1, y2 = np.asarray(drop(x)), np.asarray(drop(x))
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert _within(kept.sum(), kept.size, 0.75)
    assert not np.array_equal(y1 != 0, y2 != 0)  # the stream advances: each call draws a new mask
    drop.eval()
    assert np.array_equal(np.asarray(drop(x)), np.asarray(x))
    drop.train()
    assert np.asarray(drop(x, deterministic=True)).tolist() == np.asarray(x).tolist()


def test_mean_is_preserved_and_bad_arguments_are_errors():
    y = HashDropout(0.1, rngs=nnx.Rngs(dropout=1))(jnp.ones((2000, 500)))
    assert abs(float(jnp.mean(y)) - 1.0) < 5 * np.sqrt(0.1 * 0.9 / 1e6) / 0.9
    with pytest.raises(ValueError, match="at most"):
        keep_mask(jax.random.key(0), (2 ** 16, 2 ** 16), 0.1)
    with pytest.raises(ValueError, match="rate"):
        keep_mask(jax.random.key(0), (4,), 1.0)
