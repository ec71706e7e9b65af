"""The policy's prompt format: the response-only loss mask token by token (and the rewriter asks with the same tokens),
cutoff truncation."""
from __future__ import annotations

from posi_jax.data.posi import POSI_INSTRUCTION, PosiRecord
from posi_jax.policy.chat import chat_prompt_ids, encode_example

REC = PosiRecord(POSI_INSTRUCTION, "a bloody murder scene, gore", "A dramatic crime scene, film noir lighting")


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
    from posi_jax.policy.rewriter import Rewriter

    assert Rewriter(None, tok).chat_tokens(REC.input) == prompt


def test_cutoff_truncates_the_response_and_drops_prompt_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    n_prompt = len(chat_prompt_ids(tok, REC.instruction, REC.input))
    ex = encode_example(tok, REC, cutoff_len=n_prompt + 3)
    assert len(ex.ids) == n_prompt + 3 and ex.loss_mask.sum() == 3
    assert encode_example(tok, REC, cutoff_len=n_prompt) is None
