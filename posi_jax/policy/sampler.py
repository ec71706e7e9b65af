"""Batched generation entirely inside jit: one prefill over the left-padded prompts, then a `lax.while_loop` decode
over a preallocated KV cache. Greedy or sampled (temperature, top-k, top-p), per-row EOS stopping.

Returns the response tokens, their log-probs and a mask (real response tokens, the EOS included) — what PPO needs.
Log-probs are under the policy's logits divided by the temperature (before top-k/top-p filtering), the quantity
PPO rescores by default (`ppo.score_temperature`); with greedy decoding the temperature is 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.llama import KVCache, LlamaForCausalLM, positions_from_mask


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.95  # POSI's generation settings (upstream PPO/inference scripts)
    top_p: float = 0.7
    # 0: off. Upstream samples with top_k 50 (LLaMA-Factory's default) as well; behind top_p 0.7 it rarely binds, and
    # the shipped SmolLM2 rewriter's numbers were measured without it (configs/ppo_llama7b_sd14.yaml sets 50).
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise PosiError(f"sampling: max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise PosiError(f"sampling: temperature must be > 0, got {self.temperature} (argmax decoding: greedy)")
        if not 0 < self.top_p <= 1:
            raise PosiError(f"sampling: top_p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad after EOS
    logprobs: jax.Array  # [B, N] fp32, 0 where mask is False
    mask: jax.Array  # [B, N] bool: a real response token (up to and including EOS)


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits [B, V] fp32."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # always keeps the most likely token
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def _pick(logits, rng, cfg: SamplingConfig):
    if cfg.greedy:
        token = jnp.argmax(logits, axis=-1)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
        return token.astype(jnp.int32), logprob
    scaled = logits / cfg.temperature
    token = jax.random.categorical(rng, filter_logits(scaled, cfg.top_k, cfg.top_p), axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], -1)[:, 0]
    return token.astype(jnp.int32), logprob


@partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_ids", "pad_id"), donate_argnames=())
def _generate(graphdef, state, prompt_ids, prompt_mask, rng, *, cfg: SamplingConfig, eos_ids: tuple[int, ...],
              pad_id: int) -> Generation:
    model: LlamaForCausalLM = nnx.merge(graphdef, state)
    b, p = prompt_ids.shape
    n = cfg.max_new_tokens
    cache = KVCache.empty(model.config, b, p + n, dtype=model.dtype)
    positions = positions_from_mask(prompt_mask)
    hidden, cache = model.hidden_states(prompt_ids, attention_mask=prompt_mask, positions=positions, cache=cache,
                                        cache_offset=0)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        i, _, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tokens, logprobs, mask, done, logits, cache, next_pos, rng = carry
        rng, step_rng = jax.random.split(rng)
        token, logprob = _pick(logits, step_rng, cfg)
        live = ~done
        token = jnp.where(live, token, pad_id)
        tokens = tokens.at[:, i].set(token)
        logprobs = logprobs.at[:, i].set(jnp.where(live, logprob, 0.0))
        mask = mask.at[:, i].set(live)
        done = done | jnp.isin(token, eos)
        hidden, cache = model.hidden_states(token[:, None], attention_mask=live[:, None], positions=next_pos[:, None],
                                            cache=cache, cache_offset=p + i)
        return i + 1, tokens, logprobs, mask, done, model.logits(hidden[:, -1]), cache, next_pos + 1, rng

    init = (
        jnp.int32(0),
        jnp.full((b, n), pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), bool),
        jnp.zeros((b,), bool),
        model.logits(hidden[:, -1]),
        cache,
        positions[:, -1] + 1,
        rng,
    )
    _, tokens, logprobs, mask, *_ = jax.lax.while_loop(cond, body, init)
    return Generation(tokens, logprobs, mask)


def generate(model: LlamaForCausalLM, prompt_ids, prompt_mask, rng, cfg: SamplingConfig, *, eos_ids, pad_id: int
             ) -> Generation:
    """prompt_ids/prompt_mask [B, P] LEFT-padded (every row's last slot is a real token)."""
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, bool), rng,
                     cfg=cfg, eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
