"""The one home of the policy's prompt format: instruction + prompt -> request tokens, record -> training example,
generated text -> rewritten prompt.

Two formats (`TEMPLATES`), chosen per model and recorded with it (`Tokenizer.prompt_template`, written by SFT into
its adapter and run config, by PPO into its run config, and into an exported folder's tokenizer_config.json):
- "chat": the tokenizer's own chat template (system = instruction, user = prompt, then the assistant header). The
  shipped SmolLM2 rewriter uses it.
- "default": LLaMA-Factory's `default` template, which every upstream POSI command uses (`--template default`):
  BOS + ids(DEFAULT_SYSTEM) + ids("\\n") + ids("Human: " + query + "\\nAssistant:"), query = instruction + "\\n" +
  prompt, each piece tokenized on its own without special tokens; the SFT target is ids(output) + EOS.
"auto" (the setting's default) keeps the format a checkpoint recorded, else picks "chat" when the tokenizer has a chat
template and "default" when it has none (a base LLaMA-7B tokenizer).

The rewriter, SFT and PPO all call these functions, so training and inference see the same tokens.
"""
from __future__ import annotations

import warnings

import numpy as np

from posi_jax.data.batches import Example
from posi_jax.data.posi import PosiRecord
from posi_jax.errors import PosiError

TEMPLATES = ("auto", "chat", "default")
# LLaMA-Factory's `default` template (upstream src/llmtuner/data/template.py): its system text, the separator after
# it, and the turn that wraps the query.
DEFAULT_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
DEFAULT_SEPARATOR = "\n"
# LLaMA-Factory keeps at least this many target tokens when it shortens an over-long example (reserved_label_len).
RESERVED_LABEL_LEN = 1


def check_template(name: str, where: str = "template") -> str:
    if name not in TEMPLATES:
        raise PosiError(f"{where}: {name!r} is not one of {', '.join(TEMPLATES)}")
    return name


def template_of(tokenizer) -> str:
    """The format this tokenizer's model uses: the recorded one, else "chat" with a chat template, else "default"."""
    recorded = getattr(tokenizer, "prompt_template", None)
    if recorded in ("chat", "default"):
        return recorded
    return "chat" if tokenizer.chat_template is not None else "default"


def use_template(tokenizer, name: str, where: str = "template") -> str:
    """Apply a `template` setting to a loaded tokenizer (in place) and return the format now in use. "auto" keeps
    what the checkpoint recorded (or the automatic choice); "chat" needs a chat template."""
    check_template(name, where)
    if name == "chat" and tokenizer.chat_template is None:
        raise PosiError(f"{where}: 'chat' needs a tokenizer with a chat template; this one has none "
                        "(use 'default', LLaMA-Factory's template, or 'auto')")
    tokenizer.prompt_template = template_of(tokenizer) if name == "auto" else name
    return tokenizer.prompt_template


def chat_messages(instruction: str, prompt: str, response: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def chat_prompt_ids(tokenizer, instruction: str, prompt: str) -> list[int]:
    """Token ids of the chat-formatted request (system = instruction, user = prompt, then the assistant header)."""
    return tokenizer.encode(tokenizer.apply_chat_template(chat_messages(instruction, prompt), add_generation_prompt=True))


def default_query(instruction: str, prompt: str) -> str:
    """LLaMA-Factory's query of a record: instruction, then a newline and the input when there is one."""
    return f"{instruction}\n{prompt}" if prompt else instruction


def default_prompt_ids(tokenizer, instruction: str, prompt: str) -> list[int]:
    """Token ids of the request in LLaMA-Factory's `default` template (see the module docstring)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.add_bos else []
    return (bos + tokenizer.encode(DEFAULT_SYSTEM) + tokenizer.encode(DEFAULT_SEPARATOR)
            + tokenizer.encode(f"Human: {default_query(instruction, prompt)}\nAssistant:"))


def prompt_ids(tokenizer, instruction: str, prompt: str) -> list[int]:
    """Token ids of the request in the tokenizer's format (`template_of`)."""
    if template_of(tokenizer) == "default":
        return default_prompt_ids(tokenizer, instruction, prompt)
    return chat_prompt_ids(tokenizer, instruction, prompt)


def request_ids(tokenizer, instruction: str, prompt: str, max_prompt_tokens: int) -> list[int]:
    """`prompt_ids` of one user prompt, stripped, and cut to `max_prompt_tokens` tokens with a warning."""
    text = check_prompts([prompt])[0].strip()
    ids = tokenizer.encode(text)
    if len(ids) > max_prompt_tokens:
        warnings.warn(f"prompt of {len(ids)} tokens truncated to {max_prompt_tokens}: {text[:40]!r}...", stacklevel=3)
        text = tokenizer.decode(ids[:max_prompt_tokens])
    return prompt_ids(tokenizer, instruction, text)


def _example(prompt: list[int], response: list[int]) -> Example:
    mask = np.zeros(len(prompt) + len(response), bool)
    mask[len(prompt):] = True
    return Example(np.asarray(prompt + response, np.int32), mask)


def _encode_default(tokenizer, record: PosiRecord, cutoff_len: int) -> Example | None:
    """LLaMA-Factory's supervised example: target = ids(output) + EOS; an over-long example loses the end of its
    source and of its target in proportion to their lengths (at least RESERVED_LABEL_LEN target tokens stay)."""
    if not record.output:
        return None  # upstream skips records without a response
    source = default_prompt_ids(tokenizer, record.instruction, record.input)
    target = tokenizer.encode(record.output) + [tokenizer.eos_ids[0]]
    if len(source) + len(target) > cutoff_len:
        max_target = max(int(cutoff_len * len(target) / (len(source) + len(target))), RESERVED_LABEL_LEN)
        source, target = source[: max(cutoff_len - max_target, 0)], target[:max_target]
    return _example(source, target)


def _encode_chat(tokenizer, record: PosiRecord, cutoff_len: int) -> Example | None:
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
    response = (prompt + response)[:cutoff_len][len(prompt):]
    return _example(prompt, response) if response else None


def encode_example(tokenizer, record: PosiRecord, cutoff_len: int) -> Example | None:
    """Prompt + response tokens with a response-only loss mask, at most `cutoff_len` tokens, in the tokenizer's format.

    chat: the response is what the chat template renders after the generation prompt, up to and including the
    end-of-turn (EOS) token (the template's trailing newline after EOS is not trained); truncation cuts the end of the
    sequence, and an example with no response token left (the prompt alone fills the cutoff) gives None.
    default: LLaMA-Factory's (see `_encode_default`); a record without output gives None.
    """
    if template_of(tokenizer) == "default":
        return _encode_default(tokenizer, record, cutoff_len)
    return _encode_chat(tokenizer, record, cutoff_len)


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
