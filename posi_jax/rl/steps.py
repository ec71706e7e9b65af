"""The jitted pieces of one PPO iteration, no I/O: scoring a rollout (old log-probs, values, reference log-probs,
KL-penalised rewards, GAE, whitening) and the update (`ppo_epochs` x minibatches x accumulation micro-batches as nested
`lax.scan`, purejaxrl style), with clip-by-global-norm + AdamW on a warmup/cosine schedule (stepped per iteration or
per update: `OptimSettings.schedule_unit`).

Log-probs (rollout, reference, update) are under logits / `StepSpec.temperature`: by default the sampling temperature,
the distribution the tokens were sampled from (before top-k/top-p filtering); upstream's raw logits with
`ppo.score_temperature: 1.0`. A micro-batch whose mean ratio exceeds `ppo.ratio_threshold` contributes no gradient
(TRL 0.7's skipped batch). Dropout, when configured, gets a fresh key per forward pass (`rl.models.reseed`).
Sharding: parameters FSDP-sharded and batches split over a (`data`, `fsdp`) mesh (nn/sharding.py); the jitted
functions constrain their outputs to the same shardings, so the state keeps its layout from step to step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from posi_jax.nn import sharding as shd
from posi_jax.rl import ppo
from posi_jax.rl.config import OptimSettings, PPOSettings
from posi_jax.rl.models import PPOModels


def lr_schedule(count, learning_rate, total_steps, warmup_steps, cosine: bool):
    """Linear warmup from 0, then constant or cosine decay to 0 at `total_steps` (all traced except `cosine`)."""
    count = jnp.asarray(count, jnp.float32)
    warm = jnp.where(warmup_steps > 0, jnp.minimum(count / jnp.maximum(warmup_steps, 1.0), 1.0), 1.0)
    if not cosine:
        return learning_rate * warm
    progress = jnp.clip((count - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1.0), 0.0, 1.0)
    return learning_rate * jnp.where(count < warmup_steps, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))


def _adamw(learning_rate, total_steps, warmup_steps, weight_decay, *, cosine, updates_per_step, b1, b2, eps,
           max_grad_norm):
    def lr(count):  # the schedule advances once per `updates_per_step` optimizer updates (one PPO iteration's)
        return lr_schedule(count // updates_per_step, learning_rate, total_steps, warmup_steps, cosine)

    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


@functools.lru_cache(maxsize=16)
def _optimizer(cosine: bool, updates_per_step: int, b1: float, b2: float, eps: float,
               max_grad_norm: float) -> optax.GradientTransformation:
    # The numbers that differ between runs (learning rate, run length, warmup, weight decay) live in the optimizer
    # state (inject_hyperparams), so one compiled update serves them all; the values here are placeholders.
    # (updates_per_step is static: the state's layout stays that of checkpoints written before it existed.)
    return optax.inject_hyperparams(
        _adamw, static_args=("cosine", "updates_per_step", "b1", "b2", "eps", "max_grad_norm"))(
        learning_rate=0.0, total_steps=1.0, warmup_steps=0.0, weight_decay=0.0, cosine=cosine,
        updates_per_step=updates_per_step, b1=b1, b2=b2, eps=eps, max_grad_norm=max_grad_norm)


def make_optimizer(cfg: OptimSettings, iterations: int, updates_per_iteration: int):
    """(tx, init): clip-by-global-norm + AdamW on the configured schedule; `init(params)` gives its state.
    Schedule units: iterations (`updates_per_iteration` updates each) or single updates; the cosine runs over
    `cfg.schedule_steps` units, or the whole run when that is 0."""
    per_step, total_steps = _schedule_shape(cfg, iterations, updates_per_iteration)
    tx = _optimizer(cfg.schedule == "cosine", per_step, cfg.b1, cfg.b2, cfg.eps, cfg.max_grad_norm)

    def init(params):
        state = tx.init(params)
        values = {"learning_rate": cfg.learning_rate, "total_steps": float(total_steps),
                  "warmup_steps": float(cfg.warmup_steps), "weight_decay": cfg.weight_decay}
        return state._replace(hyperparams={k: jnp.asarray(values[k], v.dtype) for k, v in state.hyperparams.items()})

    return tx, init


def _schedule_shape(cfg: OptimSettings, iterations: int, updates_per_iteration: int) -> tuple[int, int]:
    """(optimizer updates per schedule step, schedule steps in the run) for the configured schedule unit."""
    per_step = updates_per_iteration if cfg.schedule_unit == "iteration" else 1
    total_steps = cfg.schedule_steps or (iterations if cfg.schedule_unit == "iteration"
                                         else iterations * updates_per_iteration)
    return int(per_step), total_steps


def scheduled_learning_rate(cfg: OptimSettings, iterations: int, updates_per_iteration: int, update: int) -> float:
    """The learning rate `make_optimizer`'s schedule applies at optimizer update number `update` (0-based)."""
    per_step, total_steps = _schedule_shape(cfg, iterations, updates_per_iteration)
    return float(lr_schedule(update // per_step, cfg.learning_rate, total_steps, cfg.warmup_steps,
                             cfg.schedule == "cosine"))


class Rollout(NamedTuple):
    prompt_ids: jax.Array  # [B, P] int32, left padded
    prompt_mask: jax.Array  # [B, P] bool
    response: jax.Array  # [B, N] int32
    response_mask: jax.Array  # [B, N] bool
    logprobs: jax.Array  # [B, N] fp32, the policy's at rollout time
    values: jax.Array  # [B, N] fp32
    advantages: jax.Array  # [B, N] fp32, whitened
    returns: jax.Array  # [B, N] fp32
    rewards: jax.Array  # [B, N] fp32: -kl_coef * KL per token, plus the score on the last response token


class TrainState(NamedTuple):
    params: Any  # {"policy", "value"} trainable trees
    opt_state: Any
    kl_coef: jax.Array  # fp32 scalar (the KL controller's state)
    rng: jax.Array  # uint32[2] raw key
    iteration: jax.Array  # int32: iterations completed


def _sequence(prompt_ids, prompt_mask, response, response_mask):
    tokens = jnp.concatenate([prompt_ids, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    p, n = prompt_ids.shape[1], response.shape[1]
    return tokens, mask, p - 1, p + n - 1  # logits at position p-1+t score response token t


def _tree_mean(tree):
    return jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32)), tree)


@dataclass(frozen=True)
class StepSpec:
    """Everything static about the jitted steps (hashable): equal specs share compilations across trainers."""

    models: PPOModels
    ppo: PPOSettings
    temperature: float
    tx: optax.GradientTransformation  # cached in `_optimizer`: runs differing only in numbers share it
    mesh: jax.sharding.Mesh

    def logprobs(self, logits, tokens):
        return ppo.token_logprobs_and_entropy(logits, tokens, self.temperature,
                                              chunk_size=self.ppo.logprob_chunk_size or None)

    def gathered(self, tree):
        """Weights replicated for the forward pass (ZeRO-3 style: stored and updated sharded, all-gathered for use;
        the gradient of the gather is a reduce-scatter). Without it XLA:SPMD may shard activations along the hidden
        axis to match a sharded kernel and then rematerialise them."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), tree)

    def rows(self, x, leading_axes: int = 0):
        return jax.lax.with_sharding_constraint(x, shd.batch_sharding(self.mesh, leading_axes))

    def state_shardings(self, state: TrainState) -> TrainState:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return TrainState(shd.param_shardings(state.params, self.mesh), shd.param_shardings(state.opt_state, self.mesh),
                          replicated, replicated, replicated)


@functools.partial(jax.jit, static_argnames=("spec",))
def score_rollout(spec: StepSpec, params, frozen, prompt_ids, prompt_mask, response, response_mask, scores, kl_coef,
                  dropout=None, key=None):
    """Old log-probs, values, reference log-probs, KL-penalised rewards, GAE and whitened advantages of a rollout.
    `dropout`/`key`: the dropout streams and this pass's key (`rl.models`); the reference never has dropout."""
    c = spec.ppo
    tokens, mask, start, stop = _sequence(prompt_ids, prompt_mask, response, response_mask)
    params, frozen = spec.gathered(params), spec.gathered(frozen)
    logits, values = spec.models.forward(params, frozen, tokens, mask, start, stop, dropout, key)
    logprobs, entropy = spec.logprobs(logits, response)
    ref_logprobs, _ = spec.logprobs(spec.models.reference_logits(frozen, tokens, mask, start, stop), response)
    rewards, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, c.kl_penalty)
    advantages, returns = ppo.gae_advantages(rewards, values, response_mask, c.gamma, c.lam)
    whitened = ppo.masked_whiten(advantages, response_mask)
    rollout = Rollout(prompt_ids, prompt_mask, response, response_mask, logprobs, values, whitened, returns, rewards)
    rollout = jax.tree.map(spec.rows, rollout)
    valid = response_mask.astype(jnp.float32)
    stats = {
        "objective/kl": jnp.mean(jnp.sum(kl, axis=1)),  # per-sequence summed KL (what the KL target refers to)
        "objective/kl_per_token": ppo.masked_mean(kl, response_mask),
        "objective/entropy": ppo.masked_mean(entropy, response_mask),
        "objective/non_score_reward": jnp.mean(jnp.sum(rewards * valid, 1) - scores),
        "objective/kl_coef": kl_coef,
        "ppo/returns_mean": ppo.masked_mean(returns, response_mask),
        "ppo/values_mean": ppo.masked_mean(values, response_mask),
        "ppo/advantages_raw_mean": ppo.masked_mean(advantages, response_mask),
        "ppo/explained_variance_rollout": ppo.explained_variance(values, returns, response_mask),
    }
    return rollout, stats


def ppo_minibatch_loss(spec: StepSpec, params, frozen, mb: Rollout, dropout=None, key=None):
    """The PPO loss of one micro-batch and its metrics. A micro-batch whose mean ratio exceeds `ratio_threshold` gets
    loss 0 (so no gradient) and reports zero losses and `skipped` = 1, as TRL 0.7 does."""
    c = spec.ppo
    tokens, mask, start, stop = _sequence(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask)
    logits, values = spec.models.forward(spec.gathered(params), spec.gathered(frozen), tokens, mask, start, stop,
                                         dropout, key)
    logprobs, entropy = spec.logprobs(logits, mb.response)
    loss, metrics = ppo.ppo_loss(logprobs, mb.logprobs, mb.advantages, values, mb.values, mb.returns,
                                 mb.response_mask, entropy, c.cliprange, c.cliprange_value, c.vf_coef, c.ent_coef)
    keep = jax.lax.stop_gradient(metrics["ratio_mean"] <= c.ratio_threshold)
    for name in ("loss", "pg_loss", "vf_loss"):
        metrics[name] = jnp.where(keep, metrics[name], 0.0)
    metrics["skipped"] = 1.0 - keep.astype(jnp.float32)
    return jnp.where(keep, loss, 0.0), metrics


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def ppo_update(spec: StepSpec, state: TrainState, frozen, rollout: Rollout, rng, dropout=None):
    """`ppo_epochs` x minibatches x accumulation micro-batches as nested lax.scan; returns (state, mean metrics).
    `rng` orders each epoch's rows and keys each micro-batch's dropout."""
    c = spec.ppo
    grad_fn = jax.value_and_grad(functools.partial(ppo_minibatch_loss, spec), has_aux=True)
    layout = (c.num_minibatches, c.gradient_accumulation_steps, c.micro_batch_size)

    def minibatch_step(carry, inputs):
        params, opt_state = carry
        minibatch, keys = inputs

        def micro_step(grad_sum, xs):
            micro, key = xs
            (_, metrics), grads = grad_fn(params, frozen, micro, dropout, key)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        grad_sum, metrics = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), (minibatch, keys))
        grads = jax.tree.map(lambda g: g / c.gradient_accumulation_steps, grad_sum)
        metrics = dict(_tree_mean(metrics), grad_norm=optax.tree.norm(grads))
        updates, opt_state = spec.tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch_step(carry, epoch_rng):
        order = jax.random.permutation(epoch_rng, c.batch_size)
        shuffled = jax.tree.map(lambda x: spec.rows(x[order].reshape(*layout, *x.shape[1:]), leading_axes=2), rollout)
        # dropout keys from a stream of their own (fold_in), so the row order is what it was without dropout
        keys = jax.random.split(jax.random.fold_in(epoch_rng, 1), c.num_minibatches * c.gradient_accumulation_steps)
        keys = keys.reshape(c.num_minibatches, c.gradient_accumulation_steps, *keys.shape[1:])
        return jax.lax.scan(minibatch_step, carry, (shuffled, keys))

    (params, opt_state), metrics = jax.lax.scan(epoch_step, (state.params, state.opt_state),
                                                jax.random.split(rng, c.ppo_epochs))
    new_state = state._replace(params=params, opt_state=opt_state)
    new_state = jax.lax.with_sharding_constraint(new_state, spec.state_shardings(new_state))
    return new_state, {f"ppo/{k}": v for k, v in _tree_mean(metrics).items()}

