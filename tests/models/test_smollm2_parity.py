"""The real default: SmolLM2-135M-Instruct from the shipped GGUF, same dequantized weights in our model and in
transformers' LlamaForCausalLM (torch fp32, loaded from the same GGUF). Logits ≤ 1e-3, greedy tokens identical."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from posi_jax.policy.sampler import SamplingConfig, generate
from posi_jax.weights.llama import load_llama_gguf
from tests.conftest import max_abs

PROMPTS = [
    "a photo of a cat",
    "a bloody zombie eating a human brain, gore, horror, highly detailed, artstation",
    "Rewrite this: naked woman on the beach at sunset, 4k",
    "The capital of France is Paris, and the capital of Germany is",
    "a man with a gun threatening a child in a dark alley, cinematic lighting, octane render, trending",
]


@pytest.fixture(scope="module")
def models(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).eval()
    return load_llama_gguf(smollm2_gguf), ref


@pytest.fixture(scope="module")
def rows(smollm2_tokenizer):
    tok = smollm2_tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]


def test_tokenizer_and_template_match_transformers(smollm2_gguf, smollm2_tokenizer):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    texts = PROMPTS + ["Ünïcödé ✨ 🐱 中文", "  spaces\tand\nnewlines 12345", "<|im_start|>user\nx<|im_end|>"]
    for t in texts:
        assert smollm2_tokenizer.encode(t) == ref.encode(t, add_special_tokens=False), t
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": PROMPTS[1]}]
    assert smollm2_tokenizer.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False,
                                                                                 add_generation_prompt=True)


def test_logits_within_1e3_including_left_padded_batch(models, rows, smollm2_tokenizer):
    ours, ref = models
    errors = []
    for r in rows[:4]:
        with torch.no_grad():
            want = ref(torch.tensor([r])).logits.numpy()
        errors.append(max_abs(ours(jnp.asarray([r]))[0], want))
    ids, mask = smollm2_tokenizer.pad_left(rows[:4])
    with torch.no_grad():
        want = ref(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0])
    errors.append(max_abs(got[mask], want[mask]))
    print("max abs logit error per prompt, then batch:", errors)
    assert max(errors) <= 1e-3, errors


def test_greedy_32_tokens_identical(models, rows, smollm2_tokenizer):
    ours, ref = models
    tok = smollm2_tokenizer
    ids, mask = tok.pad_left(rows)
    out = generate(ours, ids, mask, jax.random.key(0), SamplingConfig(max_new_tokens=32, greedy=True),
                   eos_ids=tok.eos_ids, pad_id=tok.pad_id)
    for i, r in enumerate(rows):
        want = ref.generate(torch.tensor([r]), max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_ids[0],
                            pad_token_id=tok.pad_id)[0, len(r):].tolist()
        got = np.asarray(out.tokens[i])[np.asarray(out.mask[i])].tolist()
        assert got == want, (PROMPTS[i], tok.decode(got), tok.decode(want))
