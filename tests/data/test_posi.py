"""POSI data: loading and validation errors naming the record, the download cache, the deterministic split, and
length-bucketed batches."""
from __future__ import annotations

import json

import numpy as np
import pytest

from posi_jax.data.batches import Example, bucketed_batches, pad_batch
from posi_jax.data.posi import (POSI_INSTRUCTION, PosiRecord, load_posi_records, load_prompts, resolve_data_file,
                                split_records)
from posi_jax.errors import PosiError


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
    assert resolve_data_file(url, cache_dir=tmp_path) == cached
    assert load_posi_records(url, cache_dir=tmp_path) == [PosiRecord("i", "x", "y")]


def _examples(lengths, seed=0):
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
