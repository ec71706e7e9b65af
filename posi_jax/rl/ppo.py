"""PPO math for RLHF-style training, as pure jitted functions over [B, T] token arrays.

Conventions shared by every function here:
- `mask` is a [B, T] bool (or 0/1) array marking the valid *response* tokens. Anything else (left padding, the prompt,
  right padding, holes in the middle) is ignored: it neither contributes to a reduction nor receives or propagates
  value in GAE, and padding positions may hold garbage (even NaN) without affecting the valid outputs.
- Reductions (`masked_mean`, the losses, every metric) are over valid tokens of the whole batch, like TRL's
  `masked_mean(x, mask)`; a batch with no valid token gives 0 rather than NaN, and a fully masked row simply
  contributes nothing.
- All arithmetic is fp32 whatever the input dtype; per-token outputs are 0 at invalid positions.
- Static choices (the KL estimator, `shift_mean`, `axis`, `chunk_size`) are Python values; float coefficients are
  traced, so a schedule or a KL controller can change them without recompiling.
The semantics follow TRL's PPOTrainer (which POSI used): reward = -kl_coef * KL per token plus the scalar score on the
last response token, GAE (gamma, lam), clipped surrogate and clipped value loss (0.5 * max of squared errors),
`loss = pg_loss + vf_coef * vf_loss`. One deliberate difference: GAE skips holes in a mask (it runs over the valid
tokens of a row as if they were contiguous) where TRL's loop would run through them; for left/right padding the two
agree exactly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from posi_jax.errors import PosiError

KL_KINDS = ("k1", "k3", "abs", "mse")


def _check_same_shape(name: str, x: jax.Array, ref_name: str, ref: jax.Array) -> None:
    if x.shape != ref.shape:
        raise PosiError(f"ppo: {name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _valid(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask) != 0


def _f32(x) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Log-probabilities and entropy


def _logprob_and_entropy_rows(logits: jax.Array, tokens: jax.Array, inv_temperature: jax.Array):
    """(log p(token), entropy) for each row of logits [..., V], fp32.

    The max is taken on the raw logits and the fp32 cast sits inside each reduction, so a backend that fuses
    elementwise ops into reductions (GPU, TPU) never materialises an fp32 copy of [..., V].
    """
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1).astype(jnp.float32)) * inv_temperature
    shifted = logits.astype(jnp.float32) * inv_temperature - row_max[..., None]
    exp_shifted = jnp.exp(shifted)
    sum_exp = jnp.sum(exp_shifted, axis=-1)
    log_norm = jnp.log(sum_exp)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logprob = picked.astype(jnp.float32) * inv_temperature - row_max - log_norm
    # -inf logits (a vocabulary mask) have p = 0 and contribute 0, not 0 * -inf = NaN.
    # (The where is on `shifted` itself so the gradient stays finite too.)
    safe_shifted = jnp.where(exp_shifted > 0, shifted, 0.0)
    entropy = log_norm - jnp.sum(exp_shifted * safe_shifted, axis=-1) / sum_exp
    return logprob, entropy


def _map_rows(logits: jax.Array, tokens: jax.Array, temperature, chunk_size: int | None):
    if logits.shape[:-1] != tokens.shape:
        raise PosiError(f"ppo: logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)}")
    inv_temperature = 1.0 / _f32(temperature)
    if chunk_size is None:
        return _logprob_and_entropy_rows(logits, tokens, inv_temperature)
    # Bounded memory on any backend: rows go through in chunks of `chunk_size` (a scan), forward and backward.
    vocab = logits.shape[-1]
    flat_logits, flat_tokens = logits.reshape(-1, vocab), tokens.reshape(-1)
    logprob, entropy = jax.lax.map(lambda xs: _logprob_and_entropy_rows(xs[0], xs[1], inv_temperature),
                                   (flat_logits, flat_tokens), batch_size=chunk_size)
    return logprob.reshape(tokens.shape), entropy.reshape(tokens.shape)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature=1.0, chunk_size: int | None = None) -> jax.Array:
    """log p(tokens[b, t]) under softmax(logits[b, t] / temperature), fp32, [B, T].

    `logits[b, t]` must already be the distribution that scores `tokens[b, t]` (the caller does the usual shift by
    one). A gather, never a one-hot of the vocabulary. `chunk_size` (rows of B*T at a time) bounds the fp32
    temporaries to [chunk_size, V] on backends that do not fuse the cast into the reductions (XLA:CPU).
    """
    return _map_rows(logits, tokens, temperature, chunk_size)[0]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def entropy_from_logits(logits: jax.Array, temperature=1.0, chunk_size: int | None = None) -> jax.Array:
    """Per-position entropy of softmax(logits / temperature), fp32, [B, T]: logsumexp(l) - sum(softmax(l) * l)."""
    tokens = jnp.zeros(logits.shape[:-1], jnp.int32)
    return _map_rows(logits, tokens, temperature, chunk_size)[1]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def token_logprobs_and_entropy(logits: jax.Array, tokens: jax.Array, temperature=1.0,
                               chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`token_logprobs` and `entropy_from_logits` in one pass over the logits (one log-sum-exp)."""
    return _map_rows(logits, tokens, temperature, chunk_size)


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics


@functools.partial(jax.jit, static_argnames=("axis",))
def masked_mean(x: jax.Array, mask: jax.Array, axis: int | None = None) -> jax.Array:
    """Mean of x over valid positions (all of them, or along `axis`); 0 where there is no valid position."""
    _check_same_shape("x", x, "mask", mask)
    valid = _valid(mask)
    total = jnp.sum(jnp.where(valid, _f32(x), 0.0), axis=axis)
    count = jnp.sum(valid, axis=axis).astype(jnp.float32)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("unbiased",))
def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of x over all valid positions, with Bessel's correction by default (as TRL).

    With a single valid position the variance is 0 (the correction is skipped instead of dividing by zero).
    """
    _check_same_shape("x", x, "mask", mask)
    valid = _valid(mask)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.where(valid, jnp.square(_f32(x) - mean), 0.0), mask)
    if unbiased:
        count = jnp.sum(valid).astype(jnp.float32)
        var = var * jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 1.0)
    return var


@functools.partial(jax.jit, static_argnames=("shift_mean",))
def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) with mean and unbiased var over valid tokens only; 0 at invalid positions.

    `shift_mean=False` adds the mean back (only rescales), as TRL's `masked_whiten`.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (_f32(x) - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(_valid(mask), whitened, 0.0)


@jax.jit
def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over valid tokens; 0 when Var[returns] is 0 (undefined)."""
    _check_same_shape("values", values, "returns", returns)
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(_f32(returns) - _f32(values), mask)
    return jnp.where(var_returns > 0, 1.0 - var_residual / jnp.where(var_returns > 0, var_returns, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards


@functools.partial(jax.jit, static_argnames=("kind",))
def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    k1: log p - log q (unbiased, can be negative; TRL's "kl"); k3: (q/p - 1) - log(q/p) (unbiased, >= 0);
    abs: |log p - log q|; mse: 0.5 * (log p - log q)^2.
    """
    _check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    log_ratio = _f32(logprobs) - _f32(ref_logprobs)
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return jnp.abs(log_ratio)
    if kind == "mse":
        return 0.5 * jnp.square(log_ratio)
    raise PosiError(f"ppo.kl_penalty: unknown kind {kind!r}; expected one of {', '.join(KL_KINDS)}")


def last_valid_index(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index of the last valid token of each row [B], whether the row has any valid token [B])."""
    valid = _valid(mask)
    length = valid.shape[-1]
    last = length - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
    return last, jnp.any(valid, axis=-1)


@functools.partial(jax.jit, static_argnames=("eos_ids",))
def drop_final_eos(tokens: jax.Array, mask: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """The response mask without the end-of-sequence tokens that close each row: upstream POSI's responses (pad = EOS,
    each cut after its last non-pad token), so the score lands on the last content token. A row that is nothing but
    EOS keeps its first token (upstream's "allow empty response")."""
    _check_same_shape("tokens", tokens, "mask", mask)
    valid = _valid(mask)
    content = valid & ~jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))
    last, has_content = last_valid_index(content)
    index = jnp.arange(mask.shape[-1])[None, :]
    first_valid = jnp.argmax(valid, axis=-1)
    keep = jnp.where(has_content[:, None], index <= last[:, None], index == first_valid[:, None])
    return valid & keep


@functools.partial(jax.jit, static_argnames=("kind",))
def compute_rewards(score: jax.Array, logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, kl_coef,
                    kind: str = "k1") -> tuple[jax.Array, jax.Array]:
    """Per-token rewards -kl_coef * KL, plus the scalar score [B] on the last valid response token of each row.

    Returns (rewards [B, T], kl [B, T]), both 0 at invalid positions. A row with no valid token gets no reward at all
    (its score has nowhere to go).
    """
    _check_same_shape("logprobs", logprobs, "mask", mask)
    if score.shape != mask.shape[:1]:
        raise PosiError(f"ppo.compute_rewards: score has shape {tuple(score.shape)} but the batch is {mask.shape[0]}")
    valid = _valid(mask)
    kl = jnp.where(valid, kl_penalty(logprobs, ref_logprobs, kind), 0.0)
    rewards = -_f32(kl_coef) * kl
    last, has_any = last_valid_index(mask)
    at_last = (jnp.arange(mask.shape[-1])[None, :] == last[:, None]) & has_any[:, None]
    rewards = rewards + jnp.where(at_last, _f32(score)[:, None], 0.0)
    return rewards, kl


# ---------------------------------------------------------------------------------------------------------------------
# Generalised advantage estimation


@jax.jit
def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma=1.0,
                   lam=0.95) -> tuple[jax.Array, jax.Array]:
    """GAE over the valid tokens of each row, as a reverse `lax.scan` over time.

    delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next, where "next" is the next *valid*
    token of the row (V_next = A_next = 0 after the last one). The carry is only updated at valid positions, so
    padding and holes neither receive nor propagate value. Returns (advantages, returns = advantages + values), both
    0 at invalid positions, unwhitened (whiten with `masked_whiten(advantages, mask)`, as TRL does).
    """
    _check_same_shape("rewards", rewards, "mask", mask)
    _check_same_shape("values", values, "mask", mask)
    gamma, lam = _f32(gamma), _f32(lam)
    valid = _valid(mask)
    rewards_t = jnp.where(valid, _f32(rewards), 0.0).T  # [T, B]: scan runs over time
    values_t = jnp.where(valid, _f32(values), 0.0).T

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, is_valid = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(is_valid, value, next_value), jnp.where(is_valid, advantage, next_advantage))
        return carry, jnp.where(is_valid, advantage, 0.0)

    batch = mask.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    _, advantages_t = jax.lax.scan(step, init, (rewards_t, values_t, valid.T), reverse=True)
    advantages = advantages_t.T
    returns = jnp.where(valid, advantages + values_t.T, 0.0)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------------
# Losses


@jax.jit
def policy_loss(new_logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                cliprange=0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate: masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(new - old).

    Metrics: clipfrac (share of valid tokens where the clipped term is the active one), approx_kl
    (0.5 * mean(log r^2), TRL's), approx_kl_k3 (mean((r - 1) - log r), Schulman's unbiased estimator of
    KL(old || new)), policy_kl (mean(old - new), TRL's), ratio_mean.
    """
    _check_same_shape("new_logprobs", new_logprobs, "mask", mask)
    _check_same_shape("old_logprobs", old_logprobs, "mask", mask)
    _check_same_shape("advantages", advantages, "mask", mask)
    valid = _valid(mask)
    # Padding may hold garbage: zero it before exp so neither the value nor the gradient can become inf/NaN.
    log_ratio = jnp.where(valid, _f32(new_logprobs) - _f32(old_logprobs), 0.0)
    adv = jnp.where(valid, _f32(advantages), 0.0)
    ratio = jnp.exp(log_ratio)
    cliprange = _f32(cliprange)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "approx_kl_k3": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "policy_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, metrics


@jax.jit
def value_loss(new_values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               cliprange_value=0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss 0.5 * masked_mean(max((V - R)^2, (V_clipped - R)^2)), V_clipped = clip(V, V_old +- eps).

    Metrics: vf_clipfrac (share of valid tokens where the clipped error is the larger), value_error
    (masked_mean((V - R)^2), TRL's val/error), value_mean.
    """
    _check_same_shape("new_values", new_values, "mask", mask)
    _check_same_shape("old_values", old_values, "mask", mask)
    _check_same_shape("returns", returns, "mask", mask)
    valid = _valid(mask)
    new = jnp.where(valid, _f32(new_values), 0.0)
    old = jnp.where(valid, _f32(old_values), 0.0)
    ret = jnp.where(valid, _f32(returns), 0.0)
    cliprange_value = _f32(cliprange_value)
    # clip(new, old - eps, old + eps) rather than old + clip(new - old): inside the range it returns `new` bit-exactly,
    # so the strict comparison behind vf_clipfrac is not tripped by rounding.
    new_clipped = jnp.clip(new, old - cliprange_value, old + cliprange_value)
    err_unclipped = jnp.square(new - ret)
    err_clipped = jnp.square(new_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(err_unclipped, err_clipped), mask)
    metrics = {
        "vf_clipfrac": masked_mean((err_clipped > err_unclipped).astype(jnp.float32), mask),
        "value_error": masked_mean(err_unclipped, mask),
        "value_mean": masked_mean(new, mask),
    }
    return loss, metrics


def ppo_loss(new_logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, new_values: jax.Array,
             old_values: jax.Array, returns: jax.Array, mask: jax.Array, entropy: jax.Array | None = None,
             cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ent_coef=0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss = policy_loss + vf_coef * value_loss - ent_coef * masked_mean(entropy).

    `entropy` is the per-token entropy [B, T] (`entropy_from_logits`); it is optional, and without it the entropy
    term and metric are left out (ent_coef must then be the Python number 0). `advantages` are used as given:
    whiten them beforehand. Not jitted itself (so that check can see a Python ent_coef): it is meant to be called
    inside the trainer's jitted loss, and every piece it calls is jitted.
    Metrics: loss, pg_loss, vf_loss, every metric of the two losses, explained_variance of new_values, and entropy.
    """
    pg_loss, pg_metrics = policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange)
    vf_loss, vf_metrics = value_loss(new_values, old_values, returns, mask, cliprange_value)
    loss = pg_loss + _f32(vf_coef) * vf_loss
    metrics = {"pg_loss": pg_loss, "vf_loss": vf_loss, **pg_metrics, **vf_metrics,
               "explained_variance": explained_variance(new_values, returns, mask)}
    if entropy is not None:
        _check_same_shape("entropy", entropy, "mask", mask)
        mean_entropy = masked_mean(entropy, mask)
        loss = loss - _f32(ent_coef) * mean_entropy
        metrics["entropy"] = mean_entropy
    elif not (isinstance(ent_coef, (int, float)) and ent_coef == 0):
        raise PosiError("ppo.ppo_loss: ent_coef is set but no per-token entropy was given")
    metrics["loss"] = loss
    return loss, metrics
