"""Batched generation entirely inside jit: one prefill over the left-padded prompts, then a `lax.while_loop` decode
over a preallocated KV cache. Greedy or sampled (temperature, top-k, top-p), per-row EOS stopping, and optional
prompt-lookup speculative decoding.

Each step feeds every row a window of k + 1 tokens: its last token (not yet in the cache) and k draft tokens copied
from its own context (`policy.draft`; k = 0: plain decoding, one token per step). One forward pass scores the whole
window; `accept_draft` keeps the longest prefix of the draft that the target model accepts, plus one token of its own,
so a row emits 1 to k + 1 tokens per step. Rows advance by different amounts, so each row has its own cache slot
(`cur`): the window goes to slots cur..cur+k, and a rejected token's slot is rewritten by the next step's window
before anything attends to it (the causal mask stops a query at its own slot). The output is the same as decoding
one token at a time: token for token when greedy, in distribution when sampling (see `accept_draft`).

When most rows of a batch have finished, the loop stops, keeps the unfinished rows (cache included) and continues at
half the batch size (8 -> 4 -> 2 -> 1), so finished rows stop costing compute; the same loop body serves every size.

A prefix that every prompt shares (the instruction) can be computed once and handed in (`Prefix`): its keys and
values are copied into the cache instead of being prefilled for every row.

Returns the response tokens, their log-probs and a mask (real response tokens, the EOS included) — what PPO needs —
and per-row counts of loop steps and of draft tokens proposed and accepted. Log-probs are under the policy's logits
divided by the temperature (before top-k/top-p filtering), the quantity PPO rescores by default
(`ppo.score_temperature`); with greedy decoding the temperature is 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.config import check_numbers
from posi_jax.errors import PosiError
from posi_jax.models.llama import KVCache, LlamaForCausalLM, positions_from_mask
from posi_jax.policy.draft import prompt_lookup_draft

_NUCLEUS_CANDIDATES = 64  # top-p looks at the 64 largest logits; a wider nucleus falls back to sorting the vocabulary
_SORTED_ROWS = 8  # rows sorted at a time in that fallback, only those whose nucleus is wider


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.95  # POSI's generation settings (upstream PPO/inference scripts)
    top_p: float = 0.7
    # 0: off. Upstream samples with top_k 50 (LLaMA-Factory's default) as well; behind top_p 0.7 it rarely binds, and
    # the shipped SmolLM2 rewriter's numbers were measured without it (configs/ppo_llama7b_sd14.yaml sets 50).
    top_k: int = 0
    greedy: bool = False
    prompt_lookup_tokens: int = 10  # draft tokens per step copied from the context (speculative decoding); 0: off
    prompt_lookup_ngram: int = 3  # the longest context suffix looked up

    BOUNDS: ClassVar[dict[str, str]] = {"max_new_tokens": "[1, inf)", "top_p": "(0, 1]", "top_k": "[0, inf)",
                                        "prompt_lookup_tokens": "[0, inf)", "prompt_lookup_ngram": "[1, inf)"}

    def __post_init__(self):
        check_numbers(self, "sampling.")
        if not self.greedy and not self.temperature > 0:
            raise PosiError(f"sampling.temperature must be > 0, got {self.temperature} "
                            "(argmax decoding: --greedy, or sampling.greedy=true in a config)")


class Generation(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad after EOS
    logprobs: jax.Array  # [B, N] fp32, 0 where mask is False
    mask: jax.Array  # [B, N] bool: a real response token (up to and including EOS)
    steps: jax.Array  # [B] int32: decoding steps (forward passes) the row took
    drafted: jax.Array  # [B] int32: draft tokens proposed to the row
    accepted: jax.Array  # [B] int32: draft tokens it accepted (and emitted)


def filter_logits(logits: jax.Array, top_k: int, top_p: float, needed: jax.Array | None = None) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) set to the dtype's minimum. logits [B, V] fp32.

    The nucleus is the shortest prefix of the tokens sorted by logit whose mass reaches top_p (the most likely token
    always kept), widened to every token tied with its last one. It is found among the `_NUCLEUS_CANDIDATES` largest
    logits (`lax.top_k`); only the rows whose nucleus is wider are sorted whole, `_SORTED_ROWS` at a time (XLA's CPU
    sort of a 49k vocabulary costs ~10 ms a row: sorting all 352 rows of a batch-32 draft window took 3.6 s a step).
    Both paths give the same threshold. `needed` [B] bool: rows whose result is used; the others are never sorted
    (their nucleus may be cut at the candidates).
    """
    neg = jnp.finfo(logits.dtype).min
    if 0 < top_k < logits.shape[-1]:  # (a top_k as large as the vocabulary keeps everything)
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        vocab = logits.shape[-1]
        tau, wider = _nucleus_threshold(jax.lax.top_k(logits, min(_NUCLEUS_CANDIDATES, vocab))[0], log_norm, top_p)
        if _NUCLEUS_CANDIDATES < vocab:
            tau = _sorted_thresholds(logits, log_norm, tau, wider if needed is None else wider & needed, top_p)
        logits = jnp.where(logits < tau, neg, logits)
    return logits


def _nucleus_threshold(descending, log_norm, top_p: float):
    """Rows' largest logits sorted descending [R, C] and their log-normaliser [R, 1] -> (the smallest logit kept in
    the nucleus [R, 1], whether the nucleus may reach past these C logits [R])."""
    probs = jnp.exp(descending - log_norm)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # always keeps the most likely token
    return jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True), keep[:, -1]


def _sorted_thresholds(logits, log_norm, tau, wider, top_p: float):
    """tau [B, 1] with the rows flagged `wider` replaced by their threshold over the whole sorted row: those rows are
    gathered first and sorted `_SORTED_ROWS` at a time, so the cost follows how many rows need it (none: nothing)."""
    rows = logits.shape[0]
    chunk = min(_SORTED_ROWS, rows)
    count = jnp.sum(wider)
    order = jnp.argsort(~wider, stable=True)  # the wider rows first
    order = jnp.concatenate([order, jnp.zeros((-rows % chunk,), order.dtype)])  # whole chunks

    def body(state):
        start, tau = state
        index = jax.lax.dynamic_slice(order, (start,), (chunk,))
        exact, _ = _nucleus_threshold(jnp.sort(logits[index], axis=-1)[:, ::-1], log_norm[index], top_p)
        index = jnp.where(start + jnp.arange(chunk) < count, index, rows)  # past the wider rows: written nowhere
        return start + chunk, tau.at[index].set(exact, mode="drop")

    return jax.lax.while_loop(lambda state: state[0] < count, body, (jnp.int32(0), tau))[1]


def accept_draft(logits: jax.Array, draft: jax.Array | None, draft_len: jax.Array | None, rng,
                 cfg: SamplingConfig, live: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Verify a deterministic draft against the target model and pick the tokens a row emits this step.

    logits [B, K, V] fp32: the target's next-token logits at the window's K = k + 1 positions (after the row's last
    token, then after each draft token); draft [B, k] and draft_len [B] (how many draft tokens are real), or None
    when k = 0; live [B] bool, or None: the rows whose tokens are used (a finished row's are not, and its top-p
    nucleus may be cut short). Returns (tokens [B, K], logprobs [B, K], accepted [B]): the row emits
    tokens[:, :accepted + 1], the `accepted` leading draft tokens and then one token drawn from the target; logprobs
    are the target's log-softmax(logits / temperature) at each token (before filtering; temperature 1 when greedy).

    Let q_j be the target's filtered distribution (temperature, top-k, top-p) at window position j and d_{j+1} the
    draft token there. Sampling: accept d_{j+1} with probability q_j(d_{j+1}), in order, stopping at the first
    rejection (position a); at a, draw from q_a with d_{a+1} removed and renormalised, r(x) = q_a(x)[x != d] /
    (1 - q_a(d)); if all real draft tokens were accepted, draw from q_a itself. Greedy: accept d_{j+1} iff it is the
    argmax of q_j, then emit the argmax at a.

    Why the output distribution is unchanged: the draft is a function of tokens already emitted, so at each position
    it is a fixed token d given the past. The emitted token x there has probability
        P(x) = q(d) [x = d] + (1 - q(d)) r(x) = q(d) [x = d] + q(x) [x != d] = q(x),
    exactly one step of plain sampling. Position j + 1 is only reached when the token at j equalled the draft, so the
    window's logits at j + 1 were computed on the very prefix that was emitted (causal attention): q_{j+1} is the
    target's conditional given the emitted past. By induction over positions (fresh randomness for each), the emitted
    sequence has the law of one-token-at-a-time sampling; EOS and the token budget cut it in the same places.
    Greedy is the one-hot limit: the emitted tokens are the argmax chain.
    """
    b, window, vocab = logits.shape
    k = window - 1
    positions = jnp.arange(k)
    if cfg.greedy:
        scaled = logits
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K]
        ok = (draft == tokens[:, :k]) if k else None
    else:
        scaled = logits / cfg.temperature
        # a window position's distribution is used up to the row's last real draft token (the one after it is the
        # bonus token's): the rest are never sorted
        needed = (jnp.arange(window) <= draft_len[:, None]) if k else jnp.ones((b, window), bool)
        if live is not None:
            needed = needed & live[:, None]
        filtered = filter_logits(scaled.reshape(b * window, vocab), cfg.top_k, cfg.top_p,
                                 needed.reshape(b * window)).reshape(b, window, vocab)
        if k:
            rng, accept_rng = jax.random.split(rng)
            q_draft = jnp.exp(jnp.take_along_axis(filtered[:, :k], draft[..., None], axis=-1)[..., 0]
                              - jax.nn.logsumexp(filtered[:, :k], axis=-1))
            ok = jax.random.uniform(accept_rng, (b, k)) < q_draft
    if k:
        ok = ok & (positions < draft_len[:, None])
        accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    else:
        accepted = jnp.zeros((b,), jnp.int32)
    if not cfg.greedy:
        at = jnp.take_along_axis(filtered, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
        if k:
            neg = jnp.finfo(at.dtype).min
            padded = jnp.concatenate([draft, jnp.full((b, 1), -1, draft.dtype)], axis=1)
            rejected_token = jnp.where(accepted < draft_len, padded[jnp.arange(b), accepted], -1)
            residual = jnp.where(jnp.arange(vocab) == rejected_token[:, None], neg, at)
            # q(d) = 1 leaves no residual mass; a rejection then only comes from rounding, and d stands.
            at = jnp.where(jnp.any(residual > neg, axis=-1, keepdims=True), residual, at)
        bonus = jax.random.categorical(rng, at, axis=-1).astype(jnp.int32)
        proposed = jnp.concatenate([draft, jnp.zeros((b, 1), jnp.int32)], axis=1) if k else jnp.zeros((b, 1), jnp.int32)
        tokens = jnp.where(jnp.arange(window) == accepted[:, None], bonus[:, None], proposed)
    logprobs = (jnp.take_along_axis(scaled, tokens[..., None], axis=-1)[..., 0]
                - jax.nn.logsumexp(scaled, axis=-1))
    return tokens, logprobs, accepted


class Prefix(NamedTuple):
    """The keys and values of a prompt prefix that every request shares (the instruction in the chat template),
    computed once at positions 0..L-1: k, v [num_layers, Hkv, L, D]."""
    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[2]


@partial(jax.jit, static_argnames=("graphdef",))
def _prefix(graphdef, state, tokens) -> Prefix:
    model: LlamaForCausalLM = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config, 1, tokens.shape[0], dtype=model.dtype)
    _, cache = model.hidden_states(tokens[None], cache=cache, cache_offset=0)
    return Prefix(jnp.stack([k[0] for k in cache.k]), jnp.stack([v[0] for v in cache.v]))


def compute_prefix(model: LlamaForCausalLM, tokens) -> Prefix:
    """The shared prefix's keys and values under `model` (one forward pass over the L tokens)."""
    graphdef, state = nnx.split(model)
    return _prefix(graphdef, state, jnp.asarray(tokens, jnp.int32))


class _Rows(NamedTuple):
    """The loop state of the rows still being decoded (a batch that shrinks as rows finish)."""
    rows: jax.Array  # [b] int32: each row's index in the caller's batch
    seq: jax.Array  # [b, P + N + k] int32: prompt, then generated tokens (the draft's context and the output)
    cur: jax.Array  # [b] int32: slot of the row's last token, the one not yet in the cache
    start: jax.Array  # [b] int32: slot of the row's first real prompt token (left padding before it)
    done: jax.Array  # [b] bool
    logprobs: jax.Array  # [b, N] fp32
    steps: jax.Array  # [b] int32
    drafted: jax.Array  # [b] int32
    accepted: jax.Array  # [b] int32
    cache: KVCache


def _batch_sizes(batch: int, shrink: bool) -> list[int]:
    sizes = [batch]
    while shrink and sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _take_rows(r: _Rows, order: jax.Array) -> _Rows:
    return _Rows(*(a[order] for a in r[:-1]), r.cache.take_rows(order))


@partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_ids", "pad_id", "shrink"))
def _generate(graphdef, state, prompt_ids, prompt_mask, rng, prefix, *, cfg: SamplingConfig, eos_ids: tuple[int, ...],
              pad_id: int, shrink: bool) -> Generation:
    model: LlamaForCausalLM = nnx.merge(graphdef, state)
    b, p = prompt_ids.shape
    n, k = cfg.max_new_tokens, cfg.prompt_lookup_tokens
    window = k + 1
    size = p + n + k
    cache = KVCache.empty(model.config, b, size, dtype=model.dtype)
    start = (p - jnp.sum(prompt_mask, axis=1)).astype(jnp.int32)
    done_upto = 0
    if prefix is not None:
        done_upto = prefix.length
        cache = cache.place(prefix.k, prefix.v, start)
    if p - 1 > done_upto:  # every prompt token but the last, which opens the first window (its logits give the first token)
        _, cache = model.hidden_states(prompt_ids[:, done_upto:-1], attention_mask=prompt_mask[:, done_upto:-1],
                                       positions=positions_from_mask(prompt_mask)[:, done_upto:-1], cache=cache,
                                       cache_offset=done_upto)
    eos = jnp.asarray(eos_ids, jnp.int32)
    offsets = jnp.arange(window)

    def body(carry):
        i, r, rng = carry
        rng, step_rng = jax.random.split(rng)
        rows = jnp.arange(r.cur.shape[0])[:, None]
        live = ~r.done
        generated = r.cur - (p - 1)
        last = jnp.take_along_axis(r.seq, r.cur[:, None], axis=1)
        if k:
            draft, draft_len = prompt_lookup_draft(r.seq, r.start, r.cur, cfg.prompt_lookup_ngram, k)
            draft_len = jnp.clip(jnp.minimum(draft_len, n - generated - 1), 0)  # past the budget: never emitted
            tokens_in, slot = jnp.concatenate([last, draft], axis=1), r.cur
        else:  # one token per step: every unfinished row is at the same slot, so the cache takes one shared offset
            draft = draft_len = None
            tokens_in, slot = last, p - 1 + i
        hidden, cache = model.hidden_states(tokens_in, attention_mask=jnp.ones(tokens_in.shape, bool),
                                            positions=(slot - r.start)[:, None] + offsets, cache=r.cache,
                                            cache_offset=slot)
        tokens, logprobs, accepted = accept_draft(model.logits(hidden), draft, draft_len, step_rng, cfg, live)
        emitted = accepted + 1
        is_eos = jnp.isin(tokens, eos) & (offsets < emitted[:, None])
        hit_eos = jnp.any(is_eos, axis=1)
        emitted = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, emitted)  # cut after the first EOS
        emitted = jnp.where(live, jnp.minimum(emitted, n - generated), 0)
        write = offsets < emitted[:, None]
        seq = r.seq.at[rows, jnp.where(write, r.cur[:, None] + 1 + offsets, size)].set(tokens, mode="drop")
        logp = r.logprobs.at[rows, jnp.where(write, generated[:, None] + offsets, n)].set(logprobs, mode="drop")
        r = r._replace(
            seq=seq, logprobs=logp, cur=r.cur + emitted, cache=cache,
            done=r.done | hit_eos | (generated + emitted >= n),
            steps=r.steps + live, accepted=r.accepted + jnp.minimum(accepted, emitted),
            drafted=r.drafted + (jnp.where(live, draft_len, 0) if k else 0))
        return i + 1, r, rng

    r = _Rows(rows=jnp.arange(b, dtype=jnp.int32),
              seq=jnp.concatenate([prompt_ids, jnp.full((b, n + k), pad_id, jnp.int32)], axis=1),
              cur=jnp.full((b,), p - 1, jnp.int32), start=start,
              done=jnp.zeros((b,), bool), logprobs=jnp.zeros((b, n), jnp.float32),
              steps=jnp.zeros((b,), jnp.int32), drafted=jnp.zeros((b,), jnp.int32),
              accepted=jnp.zeros((b,), jnp.int32), cache=cache)
    out = r  # the full batch's results, each row's written back when its batch shrinks or the loop ends
    i = jnp.int32(0)
    sizes = _batch_sizes(b, shrink)
    for phase, _ in enumerate(sizes):
        smaller = sizes[phase + 1] if phase + 1 < len(sizes) else 0
        i, r, rng = jax.lax.while_loop(lambda c: (c[0] < n) & (jnp.sum(~c[1].done) > smaller), body, (i, r, rng))
        out = out._replace(**{f: getattr(out, f).at[r.rows].set(getattr(r, f))
                              for f in ("seq", "cur", "logprobs", "steps", "drafted", "accepted")})
        if smaller:
            r = _take_rows(r, jnp.argsort(r.done, stable=True)[:smaller])  # unfinished rows first
    generated = out.cur - (p - 1)
    mask = jnp.arange(n) < generated[:, None]
    return Generation(jnp.where(mask, out.seq[:, p:p + n], pad_id), jnp.where(mask, out.logprobs, 0.0), mask,
                      out.steps, out.drafted, out.accepted)


def generate(model: LlamaForCausalLM, prompt_ids, prompt_mask, rng, cfg: SamplingConfig, *, eos_ids, pad_id: int,
             shrink: bool | None = None, prefix: Prefix | None = None) -> Generation:
    """prompt_ids/prompt_mask [B, P] LEFT-padded (every row's last slot is a real token).

    `prefix`: the keys and values of L tokens that every row's real tokens begin with, each row having more than L
    (`compute_prefix`); they are copied into each row's cache and the prefill runs over the columns after the first
    L only (a row with more padding recomputes some of its prefix there). The same output, up to float rounding.

    `shrink`: continue at half the batch size once half the rows have finished (default: when the batch is on one
    device; a batch sharded over devices keeps its shape)."""
    if shrink is None:
        sharding = getattr(prompt_ids, "sharding", None)
        shrink = sharding is None or len(sharding.device_set) == 1
    if cfg.top_k > model.config.vocab_size:
        raise PosiError(f"sampling.top_k {cfg.top_k} is larger than the model's vocabulary of {model.config.vocab_size}")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, bool), rng,
                     prefix, cfg=cfg, eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id), shrink=bool(shrink))
