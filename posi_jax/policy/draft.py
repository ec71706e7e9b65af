"""Prompt-lookup drafting: guess the next tokens of each row by copying what followed an earlier occurrence of its last
few tokens in its own context (the prompt and what it has generated so far).

A rewrite copies most of its input, so the guess is often right; the sampler verifies every guess against the model
(`policy.sampler.accept_draft`), so a wrong one costs compute, never correctness. A pure function of token arrays: no
model, fixed shapes, jittable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def prompt_lookup_draft(seq: jax.Array, start: jax.Array, end: jax.Array, ngram: int, k: int
                        ) -> tuple[jax.Array, jax.Array]:
    """Draft `k` tokens per row.

    seq [B, S] int32; row b's context is seq[b, start[b] : end[b] + 1] (its last token at `end[b]`). For the largest
    n ≤ `ngram` whose last-n-token suffix also occurs earlier in the context (ending before `end`), the draft is the
    tokens that followed the first such occurrence, as in transformers' `prompt_lookup_num_tokens`.

    Returns (draft [B, k] int32, length [B] int32): `length` counts the draft tokens that exist in the context (fewer
    than k when the occurrence lies near its end, 0 when no suffix occurs); entries past it are meaningless.
    """
    b, s = seq.shape
    slots = jnp.arange(s)
    draft_start = jnp.full((b,), -1, jnp.int32)
    for n in range(1, ngram + 1):  # a longer match, where there is one, overrides a shorter one
        match = (slots >= start[:, None]) & (slots + n <= end[:, None]) & (end - n + 1 >= start)[:, None]
        for i in range(n):
            suffix_token = jnp.take_along_axis(seq, jnp.maximum(end - n + 1 + i, 0)[:, None], axis=1)  # [B, 1]
            shifted = jnp.concatenate([seq[:, i:], jnp.full((b, i), -1, seq.dtype)], axis=1)  # shifted[:, j] = seq[:, j+i]
            match = match & (shifted == suffix_token)
        draft_start = jnp.where(match.any(axis=1), jnp.argmax(match, axis=1).astype(jnp.int32) + n, draft_start)
    found = draft_start >= 0
    idx = jnp.clip(draft_start[:, None] + jnp.arange(k), 0, s - 1)
    draft = jnp.take_along_axis(seq, idx, axis=1)
    length = jnp.where(found, jnp.clip(end + 1 - draft_start, 0, k), 0).astype(jnp.int32)
    return draft, length
