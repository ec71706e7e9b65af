"""The shared-prefix cache: copying a prefix's keys and values into each row's cache gives what prefilling every row
whole gives (tiny random LLaMA, left-padded rows of different lengths, greedy and sampled, with and without drafts),
and the rewriter takes it only for requests that begin with it."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from posi_jax.models.llama import LlamaConfig, LlamaForCausalLM
from posi_jax.policy.sampler import SamplingConfig, compute_prefix, generate

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=256)
PREFIX = [5, 17, 17, 42, 8, 91, 5, 17, 3, 60, 11]  # repeats inside it: the drafts find matches in the prefix too


@pytest.fixture(scope="module")
def model():
    from flax import nnx

    return LlamaForCausalLM(CFG, rngs=nnx.Rngs(7))


def _batch(suffix_lengths, width):
    """Left-padded rows: PREFIX + a random suffix of each length, padded to len(PREFIX) + width."""
    rng = np.random.default_rng(1)
    p = len(PREFIX) + width
    ids = np.zeros((len(suffix_lengths), p), np.int32)
    mask = np.zeros((len(suffix_lengths), p), bool)
    for row, n in enumerate(suffix_lengths):
        tokens = PREFIX + rng.integers(3, 97, n).tolist()
        ids[row, p - len(tokens):] = tokens
        mask[row, p - len(tokens):] = True
    return ids, mask


@pytest.mark.parametrize("cfg", [SamplingConfig(max_new_tokens=12, greedy=True, prompt_lookup_tokens=0),
                                 SamplingConfig(max_new_tokens=12, greedy=True, prompt_lookup_tokens=4),
                                 SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.9, prompt_lookup_tokens=4),
                                 SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.9, prompt_lookup_tokens=0)],
                         ids=["greedy", "greedy-drafts", "sampled-drafts", "sampled"])
def test_prefix_cache_gives_what_a_whole_prefill_gives(model, cfg):
    # suffixes of 1..8 tokens in a width of 8: the longest row has no padding, the shortest recomputes 7 prefix tokens
    ids, mask = _batch([1, 8, 3, 5, 8, 2], width=8)
    prefix = compute_prefix(model, PREFIX)
    assert prefix.length == len(PREFIX)
    kwargs = dict(eos_ids=(2,), pad_id=0)
    for seed in range(3):
        whole = generate(model, ids, mask, jax.random.key(seed), cfg, **kwargs)
        cached = generate(model, ids, mask, jax.random.key(seed), cfg, prefix=prefix, **kwargs)
        np.testing.assert_array_equal(np.asarray(cached.mask), np.asarray(whole.mask))
        np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(whole.tokens))
        np.testing.assert_allclose(np.asarray(cached.logprobs), np.asarray(whole.logprobs), atol=2e-5)
        assert np.asarray(whole.mask).sum() > 6  # something was generated to compare


def test_prefix_cache_matches_a_teacher_forced_forward(model):
    """Against the model itself, no cache at all: the log-prob of each generated token under a full forward pass."""
    ids, mask = _batch([4, 1, 6], width=6)
    cfg = SamplingConfig(max_new_tokens=10, greedy=True, prompt_lookup_tokens=3)
    out = generate(model, ids, mask, jax.random.key(0), cfg, eos_ids=(), pad_id=0,
                   prefix=compute_prefix(model, PREFIX))
    for row in range(ids.shape[0]):
        tokens = np.concatenate([ids[row][mask[row]], np.asarray(out.tokens[row])])
        logits, _ = model(tokens[None])
        logp = jax.nn.log_softmax(np.asarray(logits[0]), axis=-1)
        p = int(mask[row].sum())
        expected = np.asarray(logp)[np.arange(p - 1, p - 1 + 10), tokens[p:]]
        np.testing.assert_allclose(np.asarray(out.logprobs[row]), expected, atol=2e-5)
        assert (np.asarray(out.tokens[row]) == np.argmax(np.asarray(logp)[p - 1:-1], axis=-1)).all()


def test_rewriter_shares_the_instruction_and_only_with_requests_that_begin_with_it(tiny_llama_folder):
    from posi_jax.policy.rewriter import LENGTH_BUCKET, Rewriter

    rewriter = Rewriter.load(str(tiny_llama_folder), batch_size=4)
    prefix = rewriter.prefix_tokens
    rows = [rewriter.chat_tokens(p) for p in ("a cat", "a bloody knife in a dark alley", "  x  ")]
    text = rewriter.tokenizer.decode(list(prefix))
    assert rewriter.instruction in text and "a cat" not in text  # the template up to the user's prompt
    assert all(tuple(r[:len(prefix)]) == prefix for r in rows)
    longest = max(map(len, rows))
    assert rewriter.layout(rows) == (len(prefix), len(prefix) + LENGTH_BUCKET * -(-(longest - len(prefix)) // LENGTH_BUCKET))
    assert rewriter.layout(rows + [[1, 2, 3]]) == (0, LENGTH_BUCKET * -(-longest // LENGTH_BUCKET))  # not shared
    assert rewriter.layout([list(prefix)]) == (0, LENGTH_BUCKET * -(-len(prefix) // LENGTH_BUCKET))  # nothing after it
    whole = Rewriter.load(str(tiny_llama_folder), batch_size=4, share_prefix=False)
    assert whole.prefix_tokens == () and whole.layout(rows)[0] == 0
    prompts = ["a cat", "a bloody knife in a dark alley", "two dogs"]
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    assert rewriter.rewrite(prompts, greedy) == whole.rewrite(prompts, greedy)
