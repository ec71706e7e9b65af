"""Prompt-lookup drafting vs a plain Python reference: longest n-gram first, first occurrence, clipped lengths."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from posi_jax.policy import draft as draft_module

prompt_lookup_draft = jax.jit(draft_module.prompt_lookup_draft, static_argnums=(3, 4))


def reference_draft(row, start: int, end: int, ngram: int, k: int) -> list[int]:
    context = [int(t) for t in row[start:end + 1]]
    for n in range(min(ngram, len(context)), 0, -1):
        suffix = context[-n:]
        for s in range(len(context) - n):  # occurrences ending before the context's last token
            if context[s:s + n] == suffix:
                return context[s + n:s + n + k]
    return []


def test_matches_reference_on_random_contexts():
    rng = np.random.default_rng(0)
    batch, size = 64, 40
    for vocab, ngram, k in ((3, 3, 4), (5, 2, 6), (8, 1, 3), (4, 4, 10)):
        seq = rng.integers(0, vocab, (batch, size)).astype(np.int32)
        start = rng.integers(0, 10, batch).astype(np.int32)
        end = np.minimum(start + rng.integers(0, 30, batch), size - 1).astype(np.int32)
        draft, length = prompt_lookup_draft(jnp.asarray(seq), jnp.asarray(start), jnp.asarray(end), ngram, k)
        draft, length = np.asarray(draft), np.asarray(length)
        assert draft.shape == (batch, k) and length.shape == (batch,)
        for b in range(batch):
            want = reference_draft(seq[b], start[b], end[b], ngram, k)
            assert length[b] == len(want), (vocab, ngram, k, b)
            assert draft[b, :length[b]].tolist() == want


def test_prefers_the_longest_suffix_and_ignores_padding():
    seq = np.array([[0, 0, 7, 1, 2, 3, 9, 1, 2, 5, 2, 3],  # context from slot 2; "2 3" first at 4..5
                    [3, 7, 2, 3, 9, 8, 1, 6, 5, 4, 2, 3]], np.int32)  # "3" first at 0, "2 3" first at 2..3
    start, end = jnp.array([2, 0]), jnp.array([11, 11])
    draft, length = prompt_lookup_draft(jnp.asarray(seq), start, end, 2, 3)
    assert np.asarray(length).tolist() == [3, 3]
    assert np.asarray(draft).tolist() == [[9, 1, 2], [9, 8, 1]]  # the 2-gram wins over the earlier 1-gram
    draft, _ = prompt_lookup_draft(jnp.asarray(seq), start, end, 1, 3)
    assert np.asarray(draft)[1].tolist() == [7, 2, 3]
    seq[0, :2] = [2, 3]  # the suffix again, inside row 0's left padding: not a match
    draft, _ = prompt_lookup_draft(jnp.asarray(seq), start, end, 2, 3)
    assert np.asarray(draft)[0].tolist() == [9, 1, 2]


def test_no_match_and_short_contexts():
    seq = np.array([[1, 2, 3, 4, 0, 0], [5, 5, 0, 0, 0, 0], [9, 0, 0, 0, 0, 0]], np.int32)
    draft, length = prompt_lookup_draft(jnp.asarray(seq), jnp.zeros(3, jnp.int32), jnp.array([3, 1, 0]), 3, 4)
    # no repeated token; "5 5": the 1-gram 5 occurs at 0, followed by one token only; a one-token context: nothing
    assert np.asarray(length).tolist() == [0, 1, 0]
    assert int(np.asarray(draft)[1, 0]) == 5
