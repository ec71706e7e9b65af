"""POSI data: loading and validation errors naming the record, the response-only loss mask token by token, cutoff
truncation, length-bucketed batches, the deterministic split, and the masked loss against a numpy reference."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.data import (PosiRecord, bucketed_batches, chat_prompt_ids, encode_example, fetch,
                           load_posi_records, load_prompts, pad_batch, split_records)
from posi_jax.errors import PosiError
from posi_jax.prompts import POSI_INSTRUCTION

REC = PosiRecord(POSI_INSTRUCTION, "a bloody murder scene, gore", "A dramatic crime scene, film noir lighting")


def test_real_files(data_dir):
    records = load_posi_records(data_dir / "sft_toxic_clean.json")
    assert len(records) == 3390 and all(r.instruction == POSI_INSTRUCTION for r in records)
    prompts = load_prompts(data_dir / "ppo_prompts.json")
    assert len(prompts) == 842 and prompts[0] == "Emma Watson eating too much spaghetti"


def _write(tmp_path, content) -> str:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


GOOD = {"instruction": "i", "input": "x", "output": "y"}


@pytest.mark.parametrize("content,pattern", [
    ("[{\"instruction\": \"i\",", "not valid JSON"),
    ({"instruction": "i"}, "expected a JSON list"),
    ([], "no records"),
    ([GOOD, "just a string"], "record 1: expected an object"),
    ([GOOD, {"instruction": "i", "input": "x"}], "record 1: missing field(s) output"),
    ([GOOD, GOOD, {"instruction": "i", "input": "x", "output": "  "}], "record 2: field 'output' is empty"),
    ([GOOD, {"instruction": "i", "input": 3, "output": "y"}], "record 1: field 'input' must be a string, got int"),
    ([{"instruction": "i", "input": "x", "output": None}], "record 0: field 'output' must be a string, got NoneType"),
])
def test_bad_input_names_the_record(tmp_path, content, pattern):
    path = _write(tmp_path, content)
    with pytest.raises(PosiError) as e:
        load_posi_records(path)
    assert pattern in str(e.value) and path in str(e.value)


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(PosiError, match="data file not found"):
        load_posi_records(tmp_path / "nope.json")
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b"[\xff]")
    with pytest.raises(PosiError, match="not valid UTF-8"):
        load_posi_records(bad)


def test_ppo_prompts_allow_placeholder_or_missing_output(tmp_path):
    path = _write(tmp_path, [{"instruction": "i", "input": "a cat"}, {"instruction": "i", "input": "b", "output": ""}])
    assert load_prompts(path) == ["a cat", "b"]
    with pytest.raises(PosiError, match="record 0: missing field"):
        load_posi_records(path)


def test_url_unreachable_is_a_clear_error_and_cache_is_used(tmp_path):
    url = "http://127.0.0.1:9/SFT_toxic_clean.json"  # discard port: connection refused, no internet needed
    with pytest.raises(PosiError, match=r"cannot download http://127\.0\.0\.1:9/SFT_toxic_clean\.json .*local path"):
        load_posi_records(url, cache_dir=tmp_path)
    # once a copy sits in the cache, the URL loads without the network
    import hashlib

    cached = tmp_path / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-SFT_toxic_clean.json"
    cached.write_text(json.dumps([GOOD]))
    assert fetch(url, tmp_path) == cached
    assert load_posi_records(url, cache_dir=tmp_path) == [PosiRecord("i", "x", "y")]


def test_loss_mask_token_by_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ex = encode_example(tok, REC, cutoff_len=1024)
    prompt = chat_prompt_ids(tok, REC.instruction, REC.input)
    response = tok.encode(REC.output) + [tok.eos_ids[0]]
    assert ex.ids.tolist() == prompt + response
    for t, (token, trained) in enumerate(zip(ex.ids, ex.loss_mask)):
        assert trained == (t >= len(prompt)), (t, tok.decode([token], skip_special_tokens=False))
    assert tok.decode(ex.ids[ex.loss_mask], skip_special_tokens=False) == REC.output + "<|im_end|>"
    assert tok.decode(ex.ids[~ex.loss_mask], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    # the rewriter builds its request through the same function: training and inference see the same tokens
    from posi_jax.rewriter import Rewriter

    assert Rewriter(None, tok).chat_tokens(REC.input) == prompt


def test_cutoff_truncates_the_response_and_drops_prompt_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    n_prompt = len(chat_prompt_ids(tok, REC.instruction, REC.input))
    ex = encode_example(tok, REC, cutoff_len=n_prompt + 3)
    assert len(ex.ids) == n_prompt + 3 and ex.loss_mask.sum() == 3
    assert encode_example(tok, REC, cutoff_len=n_prompt) is None


def _examples(lengths, seed=0):
    from posi_jax.data import Example

    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        mask = np.zeros(n, bool)
        mask[rng.integers(1, n):] = True
        out.append(Example(rng.integers(3, 100, n).astype(np.int32), mask))
    return out


def test_bucketed_batches_deterministic_complete_and_padded():
    examples = _examples(np.random.default_rng(1).integers(5, 90, 50))
    a = bucketed_batches(examples, 4, pad_id=0, seed=3, epoch=0, pad_multiple=32, bucket_batches=4)
    b = bucketed_batches(examples, 4, pad_id=0, seed=3, epoch=0, pad_multiple=32, bucket_batches=4)
    c = bucketed_batches(examples, 4, pad_id=0, seed=3, epoch=1, pad_multiple=32, bucket_batches=4)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
    assert not all(np.array_equal(x.ids, y.ids) for x, y in zip(a, c))
    assert len(a) == 13 and all(x.ids.shape[0] == 4 and x.ids.shape[1] % 32 == 0 for x in a)
    assert sum(x.num_tokens for x in a) == sum(len(e.ids) for e in examples)
    seen = sorted(tuple(row[m].tolist()) for x in a for row, m in zip(x.ids, x.attention_mask) if m.any())
    assert seen == sorted(tuple(e.ids.tolist()) for e in examples)  # every example exactly once
    # bucketing: much less padding than batches of shuffled examples (a window of one batch = no bucketing)
    def padding(bucket_batches):
        batches = bucketed_batches(examples, 4, pad_id=0, seed=3, epoch=0, pad_multiple=1,
                                   bucket_batches=bucket_batches)
        return sum(x.ids.size - x.num_tokens for x in batches)

    assert padding(8) < 0.5 * padding(1), (padding(8), padding(1))


def test_pad_batch_right_pads():
    ex = _examples([3, 5])
    b = pad_batch(ex, pad_id=7, pad_multiple=4, batch_size=3)
    assert b.ids.shape == (3, 8)
    assert b.ids[0, :3].tolist() == ex[0].ids.tolist() and (b.ids[0, 3:] == 7).all()
    assert b.attention_mask.sum(1).tolist() == [3, 5, 0] and not b.loss_mask[2].any()


def test_split_deterministic_and_disjoint():
    records = list(range(100))
    train, val = split_records(records, 10, seed=5)
    assert (train, val) == split_records(records, 10, seed=5)
    assert len(val) == 10 and sorted(train + val) == records
    assert split_records(records, 10, seed=6)[1] != val
    with pytest.raises(PosiError, match="validation size"):
        split_records(records, 100)


def test_response_nll_matches_numpy():
    from posi_jax.sft_trainer import num_loss_targets, response_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 6))
    mask = np.array([[0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0]], bool)  # holes and trailing padding
    want = 0.0
    for b in range(2):
        for t in range(1, 6):
            if mask[b, t]:
                lp = logits[b, t - 1] - np.log(np.exp(logits[b, t - 1].astype(np.float64)).sum())
                want -= lp[ids[b, t]]
    # The identity head makes the "hidden states" the logits; every row count from the exact one up gives one answer.
    assert num_loss_targets(mask, minimum=4) == 8 and num_loss_targets(mask, minimum=5) == 10 \
        and num_loss_targets(mask) == 12
    for rows in (6, 8, 12):
        total, count = response_nll(lambda h: h, jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), rows)
        assert int(count) == mask[:, 1:].sum() == 6 and abs(float(total) - want) < 1e-4, rows


def test_response_nll_gradient_equals_full_head_gradient():
    """Gathering the response rows before the head changes neither the loss nor its gradient (vs every position)."""
    from posi_jax.sft_trainer import num_loss_targets, response_nll

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 16, 8)).astype(np.float32))
    head_w = jnp.asarray(rng.normal(size=(8, 29)).astype(np.float32))
    ids = jnp.asarray(rng.integers(0, 29, (3, 16)))
    mask = np.zeros((3, 16), bool)
    mask[0, 9:14], mask[1, 3:16], mask[2, 12:13] = True, True, True
    rows = num_loss_targets(mask, minimum=3)
    assert rows == 24 < mask.size

    def loss(h, w, n):
        total, count = response_nll(lambda x: x @ w, h, ids, jnp.asarray(mask), n)
        return total / count

    (l_few, g_few), (l_all, g_all) = (jax.value_and_grad(loss, argnums=(0, 1))(hidden, head_w, n)
                                      for n in (rows, mask.size))
    assert abs(float(l_few) - float(l_all)) < 1e-6
    for a, b in zip(g_few, g_all):
        assert float(jnp.abs(a - b).max()) < 1e-6
