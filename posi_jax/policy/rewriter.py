"""The prompt rewriter: toxic prompt in, clean prompt out, through the policy's chat template and the jitted sampler."""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import numpy as np

from posi_jax.data.posi import POSI_INSTRUCTION
from posi_jax.errors import PosiError
from posi_jax.policy.chat import check_prompts, request_ids, response_text
from posi_jax.policy.sampler import SamplingConfig, generate

LENGTH_BUCKET = 32  # prompt lengths are padded up to a multiple of this, so a handful of shapes get compiled


def padded_length(tokens: int) -> int:
    """The prompt length of a batch whose longest request has `tokens` tokens (the server compiles these ahead)."""
    return -(-tokens // LENGTH_BUCKET) * LENGTH_BUCKET


@dataclass
class Rewrite:
    original: str
    rewritten: str
    new_tokens: int
    seconds: float  # wall time of the batch this prompt was in, divided by the batch size
    steps: int = 0  # decoding steps (forward passes) this prompt took
    draft_tokens: int = 0  # prompt-lookup draft tokens proposed (SamplingConfig.prompt_lookup_tokens)
    draft_accepted: int = 0  # of which accepted

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (None when nothing was drafted)."""
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None


class Rewriter:
    def __init__(self, model, tokenizer, *, instruction: str = POSI_INSTRUCTION, max_prompt_tokens: int = 256,
                 batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.instruction = instruction
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size

    @classmethod
    def load(cls, checkpoint=None, **kwargs) -> "Rewriter":
        """`checkpoint`: None (the embedded SmolLM2-135M-Instruct + the shipped POSI SFT adapter), a .gguf file, an HF
        safetensors folder, a LoRA adapter folder, an SFT run folder or a PPO run folder (see `posi_jax.checkpoints.load_policy`)."""
        from posi_jax.checkpoints import load_policy

        model, tokenizer = load_policy(checkpoint)
        return cls(model, tokenizer, **kwargs)

    def chat_tokens(self, prompt: str) -> list[int]:
        """Token ids of the chat-formatted request for one prompt (truncating an over-long prompt with a warning)."""
        return request_ids(self.tokenizer, self.instruction, prompt, self.max_prompt_tokens)

    def rewrite(self, prompts: list[str], sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> list[str]:
        return [r.rewritten for r in self.rewrite_detailed(prompts, sampling, seed)]

    def rewrite_detailed(self, prompts: list[str], sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                         progress=None) -> list[Rewrite]:
        prompts = check_prompts(prompts)
        rows = [self.chat_tokens(p) for p in prompts]
        limit = self.model.config.max_position_embeddings
        results: list[Rewrite] = []
        rng = jax.random.key(seed)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            length = padded_length(max(len(r) for r in chunk))
            if length + sampling.max_new_tokens > limit:
                raise PosiError(f"prompt + {sampling.max_new_tokens} new tokens exceed the model's context of {limit}")
            # Pad the batch to a fixed size with copies of the first row (outputs dropped): one compiled shape.
            padded = chunk + [chunk[0]] * (self.batch_size - len(chunk)) if len(rows) > self.batch_size else chunk
            ids, mask = self.tokenizer.pad_left(padded, length)
            rng, batch_rng = jax.random.split(rng)
            t0 = time.perf_counter()
            out = generate(self.model, ids, mask, batch_rng, sampling, eos_ids=self.tokenizer.eos_ids,
                           pad_id=self.tokenizer.pad_id)
            tokens, keep = np.asarray(out.tokens), np.asarray(out.mask)
            seconds = (time.perf_counter() - t0) / len(chunk)
            steps, drafted, accepted = (np.asarray(a) for a in (out.steps, out.drafted, out.accepted))
            for j in range(len(chunk)):
                results.append(Rewrite(prompts[start + j], response_text(self.tokenizer, tokens[j], keep[j]),
                                       int(keep[j].sum()), seconds, int(steps[j]), int(drafted[j]), int(accepted[j])))
            if progress is not None:
                progress.update(len(chunk))
        return results
