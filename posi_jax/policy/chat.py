"""The one home of the policy's prompt format: instruction + prompt -> request tokens, record -> training example,
generated text -> rewritten prompt.

The rewriter, SFT and PPO all call these functions, so training and inference see the same tokens.
"""
from __future__ import annotations

import warnings

import numpy as np

from posi_jax.data.batches import Example
from posi_jax.data.posi import PosiRecord
from posi_jax.errors import PosiError


def chat_messages(instruction: str, prompt: str, response: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def chat_prompt_ids(tokenizer, instruction: str, prompt: str) -> list[int]:
    """Token ids of the chat-formatted request (system = instruction, user = prompt, then the assistant header)."""
    return tokenizer.encode(tokenizer.apply_chat_template(chat_messages(instruction, prompt), add_generation_prompt=True))


def request_ids(tokenizer, instruction: str, prompt: str, max_prompt_tokens: int) -> list[int]:
    """`chat_prompt_ids` of one user prompt, stripped, and cut to `max_prompt_tokens` tokens with a warning."""
    text = check_prompts([prompt])[0].strip()
    ids = tokenizer.encode(text)
    if len(ids) > max_prompt_tokens:
        warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_prompt_tokens}: {text[:40]!r}...", stacklevel=3)
        text = tokenizer.decode(ids[:max_prompt_tokens])
    return chat_prompt_ids(tokenizer, instruction, text)


def encode_example(tokenizer, record: PosiRecord, cutoff_len: int) -> Example | None:
    """Prompt + response tokens with a response-only loss mask, truncated to `cutoff_len` tokens.

    The response is what the chat template renders after the generation prompt, up to and including the end-of-turn
    (EOS) token; the template's trailing newline after EOS is not trained. Truncation cuts the end of the sequence;
    an example with no response token left (the prompt alone fills the cutoff) gives None.
    """
    prompt_text = tokenizer.apply_chat_template(chat_messages(record.instruction, record.input), True)
    full_text = tokenizer.apply_chat_template(chat_messages(record.instruction, record.input, record.output), False)
    if not full_text.startswith(prompt_text):
        raise PosiError("the chat template renders the conversation differently from its generation prompt; "
                        "cannot separate response tokens")
    prompt = tokenizer.encode(prompt_text)
    response = tokenizer.encode(full_text[len(prompt_text):])
    ends = [i for i, t in enumerate(response) if t in tokenizer.eos_ids]
    if ends:
        response = response[: ends[0] + 1]
    ids = (prompt + response)[:cutoff_len]
    if len(ids) <= len(prompt):
        return None
    mask = np.zeros(len(ids), bool)
    mask[len(prompt):] = True
    return Example(np.asarray(ids, np.int32), mask)


def encode_examples(tokenizer, records: list[PosiRecord], cutoff_len: int) -> tuple[list[Example], int]:
    """(examples, number dropped because the prompt alone reached the cutoff)."""
    out = [encode_example(tokenizer, r, cutoff_len) for r in records]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def check_prompts(prompts) -> list[str]:
    """Reject what cannot be rewritten before any model is loaded: no prompts, non-strings, blank prompts."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise PosiError("no prompts given")
    for i, p in enumerate(prompts, 1):
        if not isinstance(p, str):
            raise PosiError(f"prompt {i}: must be a string, got {type(p).__name__}")
        if not p.strip():
            raise PosiError(f"prompt {i}: empty prompt (nothing but whitespace)")
    return list(prompts)


def response_text(tokenizer, tokens, mask) -> str:
    """The rewritten prompt of one generated row: its kept tokens without EOS, decoded and cleaned."""
    kept = [int(t) for t, k in zip(tokens, mask) if k and int(t) not in tokenizer.eos_ids]
    return clean_response(tokenizer.decode(kept))


def clean_response(text: str) -> str:
    """The rewritten prompt as one line (a T2I prompt): whitespace runs collapsed, surrounding quotes removed."""
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
