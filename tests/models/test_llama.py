"""LLaMA parity against transformers' LlamaForCausalLM (torch, fp32) on a small random GQA config, untied embeddings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from posi_jax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM, LlamaValueModel
from posi_jax.policy.sampler import SamplingConfig, generate
from posi_jax.weights.llama import load_llama_safetensors
from tests.conftest import max_abs

LOGIT_TOL = 1e-4  # fp32, 2 layers


@pytest.fixture(scope="module")
def pair(tiny_llama_folder):
    from transformers import LlamaForCausalLM as TorchLlama

    ref = TorchLlama.from_pretrained(tiny_llama_folder, dtype=torch.float32).eval()
    return load_llama_safetensors(tiny_llama_folder), ref


def _left_padded(rows, pad=2):
    n = max(map(len, rows))
    ids = np.full((len(rows), n), pad, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    return ids, mask


def test_config_reaches_model(pair):
    ours, _ = pair
    assert ours.config.num_kv_heads == 2 and ours.config.rope_theta == 5000.0 and ours.lm_head is not None


def test_logits_match_single_and_left_padded_batch(pair):
    ours, ref = pair
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 49152, n).tolist() for n in (5, 17, 9, 30)]
    for r in rows:  # each prompt alone
        with torch.no_grad():
            want = ref(torch.tensor([r])).logits.numpy()
        got, _ = ours(jnp.asarray([r]))
        err = max_abs(got, want)
        assert err <= LOGIT_TOL, err
    ids, mask = _left_padded(rows)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got, _ = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask, bool))
    m = mask.astype(bool)
    err = max_abs(np.asarray(got)[m], want[m])  # padded positions are don't-care in both
    assert err <= LOGIT_TOL, err


def test_rope_theta_changes_output(pair):
    ours, _ = pair
    other = LlamaForCausalLM(ours.config.replace(rope_theta=10.0))
    from flax import nnx

    nnx.update(other, nnx.state(ours))
    ids = jnp.arange(3, 40)[None]
    assert max_abs(ours(ids)[0], other(ids)[0]) > 1e-3


def test_cached_decoding_equals_full_forward(pair):
    ours, _ = pair
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 49152, (2, 12)))
    full, _ = ours(ids)
    cache = KVCache.empty(ours.config, 2, 16)
    logits, cache = ours(ids[:, :7], cache=cache, cache_offset=0)
    steps = [logits]
    for t in range(7, 12):
        step, cache = ours(ids[:, t:t + 1], positions=jnp.full((2, 1), t), cache=cache, cache_offset=t)
        steps.append(step)
    assert max_abs(jnp.concatenate(steps, 1), full) <= 1e-5


def test_per_row_cache_offsets_equal_full_forward(pair):
    """Rows writing the cache at their own offsets (the speculative sampler): a row's rejected tokens are rewritten
    by its next window before anything attends to them."""
    ours, _ = pair
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(3, 49152, (2, 12)))
    junk = jnp.asarray(rng.integers(3, 49152, (2,)))
    cache = KVCache.empty(ours.config, 2, 16)
    _, cache = ours(ids[:, :5], cache=cache, cache_offset=0)
    # both rows at slot 5, a window of 3: row 0 keeps 1 token (then junk), row 1 all 3
    offset = jnp.array([5, 5])
    window = jnp.stack([jnp.stack([ids[0, 5], junk[0], junk[1]]), ids[1, 5:8]])
    _, cache = ours(window, positions=offset[:, None] + jnp.arange(3), cache=cache, cache_offset=offset)
    offset = jnp.array([6, 8])  # row 0 rewrites the junk slots
    window = jnp.stack([ids[0, 6:10], ids[1, 8:12]])
    logits, _ = ours(window, positions=offset[:, None] + jnp.arange(4), cache=cache, cache_offset=offset)
    full, _ = ours(ids)
    assert max_abs(logits[0], full[0, 6:10]) <= 1e-5
    assert max_abs(logits[1], full[1, 8:12]) <= 1e-5


def test_greedy_generation_matches_transformers(pair):
    ours, ref = pair
    rng = np.random.default_rng(2)
    rows = [rng.integers(3, 49152, n).tolist() for n in (4, 11, 7)]
    ids, mask = _left_padded(rows)
    out = generate(ours, ids, mask.astype(bool), jax.random.key(0), SamplingConfig(max_new_tokens=32, greedy=True),
                   eos_ids=(2,), pad_id=2)
    for i, r in enumerate(rows):
        want = ref.generate(torch.tensor([r]), max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2)
        want = want[0, len(r):].tolist()
        got = np.asarray(out.tokens[i])[np.asarray(out.mask[i])].tolist()
        assert got == want


def test_value_model_scalar_per_token(pair):
    ours, _ = pair
    value = LlamaValueModel(ours.config)
    from flax import nnx

    nnx.update(value.trunk, nnx.state(ours))
    v = value(jnp.ones((2, 5), jnp.int32), attention_mask=jnp.ones((2, 5), bool))
    assert v.shape == (2, 5) and v.dtype == jnp.float32
    assert float(jnp.abs(v).max()) == 0.0  # zero-initialised head: a neutral critic before training


def test_bf16_compute_close_to_fp32(pair, tiny_llama_folder):
    ours, _ = pair
    half = load_llama_safetensors(tiny_llama_folder, dtype=jnp.bfloat16)
    ids = jnp.arange(3, 20)[None]
    a, b = ours(ids)[0], half(ids)[0]
    assert b.dtype == jnp.float32  # logits always fp32
    assert 0 < max_abs(a, b) < 0.05 * float(jnp.abs(a).max())


def test_presets_shapes_without_memory():
    from flax import nnx

    for cfg, n_params in ((LlamaConfig.smollm2_135m(), 134_515_008), (LlamaConfig.llama_7b(), 6_738_415_616)):
        abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg))
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
        assert total == n_params, (cfg, total)
