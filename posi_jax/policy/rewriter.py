"""The prompt rewriter: toxic prompt in, clean prompt out, through the policy's chat template and the jitted sampler.

Every request starts with the same tokens (the template and the instruction, 36 of the ~50 tokens of a short prompt
with the shipped rewriter). Their keys and values are computed once (`policy.sampler.Prefix`) and copied into each
row's cache, so a batch's prefill only runs over what follows them: the padded length is the shared prefix plus the
rest rounded up to `LENGTH_BUCKET`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import numpy as np

from posi_jax.data.posi import POSI_INSTRUCTION
from posi_jax.errors import PosiError
from posi_jax.policy.chat import check_prompts, request_ids, response_text
from posi_jax.policy.sampler import Prefix, SamplingConfig, compute_prefix, generate

LENGTH_BUCKET = 32  # prompt lengths are padded up to a multiple of this, so a handful of shapes get compiled
# prompts told apart only after the shared prefix: its tokens are what these requests have in common
_PREFIX_PROBES = ("a", "Zebra 42, oil painting!", "\u00e9t\u00e9 \u2014 \u6771\u4eac")


def padded_length(tokens: int) -> int:
    """`tokens` rounded up to a multiple of LENGTH_BUCKET."""
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
                 batch_size: int = 8, share_prefix: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.instruction = instruction
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self._prefix_tokens: tuple[int, ...] | None = None
        self._prefix: Prefix | None = None

    @classmethod
    def load(cls, checkpoint=None, *, dtype=None, **kwargs) -> "Rewriter":
        """`checkpoint`: None (the embedded SmolLM2-135M-Instruct + the shipped POSI SFT adapter), a .gguf file, an HF
        safetensors folder, a LoRA adapter folder, an SFT run folder or a PPO run folder (see
        `posi_jax.checkpoints.load_policy`); `dtype` for compute and weights (default float32). A LoRA adapter is
        folded into its kernels: the rewriter never trains, and the adapter's two extra matmuls per projection made
        a batch-32 rewrite about 10% slower."""
        from posi_jax.checkpoints import load_policy
        from posi_jax.nn.lora import merge_lora

        model, tokenizer = load_policy(checkpoint, dtype=dtype, param_dtype=dtype)
        return cls(merge_lora(model), tokenizer, **kwargs)

    def chat_tokens(self, prompt: str) -> list[int]:
        """Token ids of the chat-formatted request for one prompt (truncating an over-long prompt with a warning)."""
        return request_ids(self.tokenizer, self.instruction, prompt, self.max_prompt_tokens)

    @property
    def prefix_tokens(self) -> tuple[int, ...]:
        """The request tokens every prompt shares (empty with `share_prefix=False`): the longest common prefix of a
        few unlike prompts' requests. A request that does not start with them is prefilled whole (`layout`)."""
        if self._prefix_tokens is None:
            rows = [self.chat_tokens(p) for p in _PREFIX_PROBES] if self.share_prefix else [[]]
            n = 0
            while all(len(r) > n + 1 and r[n] == rows[0][n] for r in rows):
                n += 1
            self._prefix_tokens = tuple(rows[0][:n])
        return self._prefix_tokens

    def layout(self, rows: list[list[int]]) -> tuple[int, int]:
        """(shared prefix tokens taken from the cache, padded prompt length) of a batch of request rows: the prefix
        when every row starts with it and goes past it, then the longest row's remaining tokens rounded up to
        LENGTH_BUCKET. The compiled shapes follow these lengths (the server compiles them ahead)."""
        prefix = self.prefix_tokens
        n = len(prefix)
        if not n or any(len(r) <= n or tuple(r[:n]) != prefix for r in rows):
            n = 0
        return n, n + padded_length(max(len(r) for r in rows) - n)

    def shared_prefix(self) -> Prefix:
        """The keys and values of `prefix_tokens` under the model, computed on first use."""
        if self._prefix is None:
            self._prefix = compute_prefix(self.model, self.prefix_tokens)
        return self._prefix

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
            shared, length = self.layout(chunk)
            if length + sampling.max_new_tokens > limit:
                raise PosiError(f"prompt + {sampling.max_new_tokens} new tokens exceed the model's context of {limit}")
            # Pad the batch to a fixed size with copies of the first row (outputs dropped): one compiled shape.
            padded = chunk + [chunk[0]] * (self.batch_size - len(chunk)) if len(rows) > self.batch_size else chunk
            ids, mask = self.tokenizer.pad_left(padded, length)
            rng, batch_rng = jax.random.split(rng)
            t0 = time.perf_counter()
            out = generate(self.model, ids, mask, batch_rng, sampling, eos_ids=self.tokenizer.eos_ids,
                           pad_id=self.tokenizer.pad_id, prefix=self.shared_prefix() if shared else None)
            tokens, keep = np.asarray(out.tokens), np.asarray(out.mask)
            seconds = (time.perf_counter() - t0) / len(chunk)
            steps, drafted, accepted = (np.asarray(a) for a in (out.steps, out.drafted, out.accepted))
            for j in range(len(chunk)):
                results.append(Rewrite(prompts[start + j], response_text(self.tokenizer, tokens[j], keep[j]),
                                       int(keep[j].sum()), seconds, int(steps[j]), int(drafted[j]), int(accepted[j])))
            if progress is not None:
                progress.update(len(chunk))
        return results
