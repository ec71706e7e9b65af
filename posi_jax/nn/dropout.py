"""Dropout whose mask is a keyed integer hash of each element's index, computed inside the fusion that applies it.

`jax.random.bernoulli` first materialises the mask's random bits (threefry, or XLA's RngBitGenerator). On CPU those
bits were the largest non-matmul cost of a LoRA SFT step: 60 masks of [tokens, hidden] per step, about a quarter of
the step's thread time. Here each call draws only 64 bits (s0, s1) from its nnx key stream, and element i is kept iff

    mix(mix(i ^ s0) + s1) >= round(rate * 2**32)

where `mix` is the "lowbias32" integer finalizer (xor-shift / multiply rounds, a bijection on uint32 with near-ideal
avalanche). That is a few integer ops per element, which XLA fuses into the select that applies the mask: no mask or
bit array is written to memory. The keep probability is exact to 2**-32; tests/nn/test_dropout.py measures the rate
and the correlations between neighbouring elements and between keys. The same key gives the same mask, so an
interrupted run resumes bit for bit. Everything else (train/eval switch, key streams, 1/(1-rate) scaling) is
nnx.Dropout's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_MAX_ELEMENTS = 2 ** 32  # the element index is a uint32


def _mix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask of `shape`, each element True with probability 1 - rate (to 2**-32), a function of `key`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    size = 1
    for n in shape:
        size *= n
    if size >= _MAX_ELEMENTS:
        raise ValueError(f"dropout over {size} elements in one call: at most {_MAX_ELEMENTS - 1}")
    s0, s1 = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return _mix(_mix(index ^ s0) + s1) >= jnp.uint32(round(rate * 2.0 ** 32))


class HashDropout(nnx.Dropout):
    """nnx.Dropout (same constructor, train/eval switch and key stream) with the mask from `keep_mask`."""

    def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rngs is None:
            raise ValueError("HashDropout in training mode needs rngs= at construction")
        keep = keep_mask(self.rngs(), inputs.shape, self.rate)
        return jnp.where(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))
