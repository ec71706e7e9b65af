"""Prompt-lookup speculative decoding in the sampler: greedy output identical to plain decoding (tiny model and the real
SmolLM2), the sampled distribution unchanged (a chi-square test against the exact distribution of a tiny model), and
log-probs equal to the target model's."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import chi2

from posi_jax.models.llama import LlamaConfig, LlamaForCausalLM
from posi_jax.policy.sampler import SamplingConfig, filter_logits, generate

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=256)


def _prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, (4, 12)).astype(np.int32)
    ids[0, 6:] = ids[0, :6]  # repeats, so the lookup finds something early
    ids[3, 8:] = ids[3, 4:8]
    mask = np.ones((4, 12), bool)
    mask[1, :5] = False  # left padding
    mask[2, :9] = False
    return ids, mask


def test_greedy_identical_to_plain_decoding():
    model = LlamaForCausalLM(CFG, rngs=nnx.Rngs(3))
    ids, mask = _prompts()
    plain = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=24, greedy=True,
                     prompt_lookup_tokens=0), eos_ids=(7,), pad_id=0, shrink=False)
    assert int(np.asarray(plain.steps).max()) == 24 and int(np.asarray(plain.drafted).sum()) == 0
    for k, shrink in ((4, False), (4, True), (1, True)):
        cfg = SamplingConfig(max_new_tokens=24, greedy=True, prompt_lookup_tokens=k, prompt_lookup_ngram=2)
        out = generate(model, ids, mask, jax.random.key(0), cfg, eos_ids=(7,), pad_id=0, shrink=shrink)
        assert np.array_equal(np.asarray(out.tokens), np.asarray(plain.tokens)), (k, shrink)
        assert np.array_equal(np.asarray(out.mask), np.asarray(plain.mask))
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(plain.logprobs), atol=1e-5)
        accepted, drafted, steps = (np.asarray(a) for a in (out.accepted, out.drafted, out.steps))
        lengths = np.asarray(out.mask).sum(1)
        assert accepted.sum() > 0 and (accepted <= drafted).all()
        assert (steps + accepted == lengths).all()  # each step: the accepted drafts + one token of the model's own
        assert (steps < lengths).any()


# The distribution test: a 6-token vocabulary (5 is EOS), 3 new tokens, temperature + top-k + top-p (each binds), so
# that the filtered conditionals of every prefix can be enumerated exactly (a teacher-forced forward per prefix). Two
# prompts chosen so that the lookup drafts tokens the model often accepts and often rejects (about half and a quarter).
TINY = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   max_position_embeddings=64)
EOS, NEW, SAMPLES = 5, 3, 4096
PROMPTS = ([4, 3, 2, 2, 2, 2, 1, 3], [2, 2, 2, 4, 0, 2, 0, 2])
SAMPLED = dict(max_new_tokens=NEW, temperature=0.8, top_k=4, top_p=0.9)


def _tiny_model():
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    # Larger weights spread the logits (the default init gives nearly uniform next-token distributions).
    nnx.update(model, jax.tree.map(lambda x: 3.0 * x, nnx.state(model, nnx.Param)))
    return model


def _exact_distribution(model, prompt: list[int], cfg: SamplingConfig):
    """{response: probability} of plain sampling, and {prefix: log-softmax(logits / T)} for the log-prob check."""
    prefixes = [()]
    log_softmax, probability = {}, {}
    for depth in range(NEW):
        rows = jnp.asarray([prompt + list(p) for p in prefixes], jnp.int32)
        logits = model(rows)[0][:, -1] / cfg.temperature
        filtered = jax.nn.softmax(filter_logits(logits, cfg.top_k, cfg.top_p), axis=-1)
        for p, lsm, q in zip(prefixes, np.asarray(jax.nn.log_softmax(logits)), np.asarray(filtered)):
            log_softmax[p], probability[p] = lsm, q
        prefixes = [p + (t,) for p in prefixes for t in range(TINY.vocab_size) if t != EOS]
    exact = {}
    for response in itertools.chain.from_iterable(
            itertools.product(range(TINY.vocab_size), repeat=n) for n in range(1, NEW + 1)):
        if EOS in response[:-1] or (len(response) < NEW and response[-1] != EOS):
            continue  # not a complete response: EOS ends one, so it is only ever last
        prob = np.prod([probability[response[:i]][t] for i, t in enumerate(response)])
        if prob > 0:
            exact[response] = prob
    return exact, log_softmax


def _chi_square_pvalue(responses: list[tuple], exact: dict) -> float:
    """Pearson's test of the responses against the exact distribution; outcomes expected < 5 times pooled."""
    n = len(responses)
    counts: dict = {}
    for r in responses:
        counts[r] = counts.get(r, 0) + 1
    assert set(counts) <= set(exact), "a response with probability 0 under the target was sampled"
    observed, expected, pooled_obs, pooled_exp = [], [], 0, 0.0
    for response, p in exact.items():
        if n * p >= 5:
            observed.append(counts.get(response, 0))
            expected.append(n * p)
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(response, 0), pooled_exp + n * p
    if pooled_exp > 0:
        observed.append(pooled_obs)
        expected.append(pooled_exp)
    observed, expected = np.asarray(observed, float), np.asarray(expected)
    return float(chi2.sf(np.sum((observed - expected) ** 2 / expected), len(expected) - 1))


@pytest.mark.parametrize("k", [0, 3])
def test_sampled_distribution_and_logprobs_unchanged(k):
    """4096 samples per prompt, with and without drafting, against the exact distribution of plain sampling (20-60
    possible responses): Pearson's chi-square must not reject at the 0.001 level. A wrong acceptance rule (drawing
    from q instead of the residual after a rejection) fails it with p < 1e-10."""
    model = _tiny_model()
    cfg = SamplingConfig(**SAMPLED, prompt_lookup_tokens=k, prompt_lookup_ngram=2)
    ids = np.repeat(np.asarray(PROMPTS, np.int32), SAMPLES, axis=0)
    out = generate(model, ids, np.ones_like(ids, bool), jax.random.key(12), cfg, eos_ids=(EOS,), pad_id=0,
                   shrink=False)
    tokens, mask, logprobs = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    for i, prompt in enumerate(PROMPTS):
        rows = range(i * SAMPLES, (i + 1) * SAMPLES)
        responses = [tuple(int(t) for t in tokens[row][mask[row]]) for row in rows]
        exact, log_softmax = _exact_distribution(model, list(prompt), cfg)
        assert _chi_square_pvalue(responses, exact) > 1e-3, prompt
        # the log-probs are the target's: log-softmax(logits / T) of each token given its prefix
        for row, r in list(zip(rows, responses))[:256]:
            want = [log_softmax[r[:j]][t] for j, t in enumerate(r)]
            np.testing.assert_allclose(logprobs[row, :len(r)], want, atol=1e-5)
            assert (logprobs[row, len(r):] == 0).all()
        if k:
            accepted, drafted = (np.asarray(a)[rows.start:rows.stop].sum() for a in (out.accepted, out.drafted))
            assert 0.1 * drafted < accepted < 0.9 * drafted  # drafts were both accepted and rejected, often


@pytest.mark.slow
def test_greedy_identical_on_smollm2(data_dir):
    """The shipped rewriter, a left-padded batch of held-out prompts of different lengths: drafting and the shrinking
    batch change nothing, token for token."""
    from posi_jax.checkpoints import load_policy
    from posi_jax.data.posi import POSI_INSTRUCTION, load_posi_records, split_records
    from posi_jax.policy.chat import request_ids

    _, val = split_records(load_posi_records(data_dir / "sft_toxic_clean.json"), 100, 0)
    model, tok = load_policy()
    rows = [request_ids(tok, POSI_INSTRUCTION, r.input, 256) for r in val[:4]]
    assert len({len(r) for r in rows}) == 4
    ids, mask = tok.pad_left(rows)
    plain = generate(model, ids, mask, jax.random.key(0),
                     SamplingConfig(max_new_tokens=64, greedy=True, prompt_lookup_tokens=0),
                     eos_ids=tok.eos_ids, pad_id=tok.pad_id, shrink=False)
    fast = generate(model, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=64, greedy=True),
                    eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    assert np.array_equal(np.asarray(fast.tokens), np.asarray(plain.tokens))
    assert np.array_equal(np.asarray(fast.mask), np.asarray(plain.mask))
    np.testing.assert_allclose(np.asarray(fast.logprobs), np.asarray(plain.logprobs), atol=1e-4)
    assert np.asarray(fast.steps).sum() < np.asarray(plain.mask).sum() / 2  # over 2 tokens per step
