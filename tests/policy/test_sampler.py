"""The jitted sampler (with its default prompt-lookup drafting): filtering vs numpy, per-row EOS stopping, log-probs vs
a teacher-forced forward, seeds. Drafting against plain decoding: test_speculative.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.errors import PosiError
from posi_jax.models.llama import LlamaConfig, LlamaForCausalLM
from posi_jax.policy.sampler import SamplingConfig, filter_logits, generate

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    from flax import nnx

    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(3))


def _prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, (3, 9)).astype(np.int32)
    mask = np.ones((3, 9), bool)
    mask[1, :4] = False  # left padding
    mask[2, :7] = False
    return ids, mask


def _numpy_nucleus(row, top_p):
    order = np.argsort(-row)
    p = np.exp(row[order] - row.max())
    p /= p.sum()
    nucleus = np.zeros(row.size, bool)
    nucleus[order[np.cumsum(p) - p < top_p]] = True
    return nucleus


@pytest.mark.parametrize("vocab,scale", [(50, 3.0), (300, 4.0), (300, 0.3)])
def test_filter_logits_matches_numpy(vocab, scale):
    # 300 tokens: the nucleus is found among the 64 largest logits (peaked rows), or by the sort (flat rows)
    logits = np.random.default_rng(1).normal(size=(4, vocab)).astype(np.float32) * scale
    for top_k, top_p in ((5, 1.0), (0, 0.7), (10, 0.5), (0, 0.05), (0, 0.95), (100, 0.9)):
        got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
        for row, out in zip(logits, got):
            keep = np.ones(vocab, bool)
            if 0 < top_k < vocab:
                keep &= row >= np.sort(row)[-top_k]
            if top_p < 1:  # nucleus of the distribution left after top-k (sequential, as transformers does)
                keep &= _numpy_nucleus(np.where(keep, row, -np.inf), top_p)
            assert np.array_equal(out > np.finfo(np.float32).min, keep), (top_k, top_p)
            assert np.array_equal(out[keep], row[keep])


def test_filter_logits_sorts_only_the_needed_wide_rows():
    """21 rows, flat (the nucleus is wider than the 64 candidates: sorted, 8 rows at a time) and peaked ones mixed:
    every needed row equals numpy's nucleus, whichever chunk sorted it; a row not needed may be cut at the
    candidates, never widened."""
    rng = np.random.default_rng(2)
    scale = np.where(rng.random(21) < 0.5, 0.2, 6.0).astype(np.float32)[:, None]
    logits = (rng.normal(size=(21, 500)) * scale).astype(np.float32)
    needed = rng.random(21) < 0.7
    got = np.asarray(filter_logits(jnp.asarray(logits), 0, 0.8, jnp.asarray(needed)))
    neg = np.finfo(np.float32).min
    flat_needed = 0
    for row, out, need in zip(logits, got, needed):
        nucleus = _numpy_nucleus(row, 0.8)
        if need:
            assert np.array_equal(out > neg, nucleus)
            flat_needed += nucleus.sum() > 64
        else:
            assert not np.any((out > neg) & ~nucleus)
    assert flat_needed > 8  # more than one chunk of sorted rows
    full = np.asarray(filter_logits(jnp.asarray(logits), 0, 0.8))
    assert all(np.array_equal(out > neg, _numpy_nucleus(row, 0.8)) for row, out in zip(logits, full))


def test_logprobs_and_mask_match_teacher_forced_forward(model):
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9)
    out = generate(model, ids, mask, jax.random.key(0), cfg, eos_ids=(2,), pad_id=0)
    assert out.tokens.shape == (3, 12) and out.logprobs.shape == (3, 12)
    full = jnp.concatenate([jnp.asarray(ids), out.tokens], 1)
    full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], 1)
    logits, _ = model(full, attention_mask=full_mask)
    logp = jax.nn.log_softmax(logits[:, 8:-1] / 0.8)  # position t predicts token t+1
    want = jnp.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
    m = np.asarray(out.mask)
    assert np.max(np.abs(np.asarray(want)[m] - np.asarray(out.logprobs)[m])) <= 1e-4
    assert np.all(np.asarray(out.logprobs)[~m] == 0)


def test_eos_stops_each_row_independently(model):
    ids, mask = _prompts()
    greedy = SamplingConfig(max_new_tokens=10, greedy=True)
    free = generate(model, ids, mask, jax.random.key(0), greedy, eos_ids=(96,), pad_id=0)
    eos = int(free.tokens[0, 3])  # make row 0's 4th token the EOS
    out = generate(model, ids, mask, jax.random.key(0), greedy, eos_ids=(eos,), pad_id=0)
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    for row in range(3):
        hits = np.nonzero(np.asarray(free.tokens[row]) == eos)[0]
        stop = hits[0] + 1 if len(hits) else 10
        assert m[row].sum() == stop and m[row, :stop].all()  # EOS itself is part of the response
        assert np.array_equal(tokens[row, :stop], np.asarray(free.tokens[row, :stop]))
        assert (tokens[row, stop:] == 0).all()
    assert m[0].sum() <= 4


def test_seeds_and_top_k_one(model):
    ids, mask = _prompts()
    sample = SamplingConfig(max_new_tokens=16, temperature=1.5, top_p=1.0)
    a = generate(model, ids, mask, jax.random.key(1), sample, eos_ids=(2,), pad_id=0).tokens
    b = generate(model, ids, mask, jax.random.key(1), sample, eos_ids=(2,), pad_id=0).tokens
    c = generate(model, ids, mask, jax.random.key(2), sample, eos_ids=(2,), pad_id=0).tokens
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    greedy = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=16, greedy=True),
                      eos_ids=(2,), pad_id=0).tokens
    top1 = generate(model, ids, mask, jax.random.key(5), SamplingConfig(max_new_tokens=16, top_k=1, top_p=1.0),
                    eos_ids=(2,), pad_id=0).tokens
    assert np.array_equal(greedy, top1)


def test_bad_sampling_settings():
    with pytest.raises(PosiError, match="temperature must be > 0"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(PosiError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(PosiError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(PosiError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(PosiError, match="prompt_lookup_tokens"):
        SamplingConfig(prompt_lookup_tokens=-2)
    with pytest.raises(PosiError, match="prompt_lookup_ngram"):
        SamplingConfig(prompt_lookup_ngram=0)
