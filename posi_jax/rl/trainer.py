"""The PPO loop: rollout with the jitted sampler -> reward -> advantages -> epochs x minibatches under one jit.

Models (all views of one set of arrays where possible):
- policy: the SFT LLaMA, trained through its LoRA adapter (default) or in full;
- reference: the frozen SFT policy. With LoRA it is the base weights run without the adapter (the policy's own frozen
  arrays under the adapter-free graph), so no second copy of the weights exists; in full mode it is a frozen copy;
- value: `LlamaValueModel`, a trunk initialised from the SFT policy plus a zero-initialised scalar head. Separate
  parameters by default (with LoRA: its own copy of the adapter over the *shared* frozen base), or with
  `shared_backbone` a head on the policy's own hidden states (TRL's `AutoModelForCausalLMWithValueHead`).

One iteration, as TRL's PPOTrainer.step (which POSI used), with the math of `rl/ppo.py`:
  prompts -> generate (rl/sampler.py) -> texts -> reward_fn(rewritten, original) -> scores [B]
  -> one jitted pass: old log-probs, values, reference log-probs, per-token KL penalty, GAE, whitening
  -> one jitted update: `ppo_epochs` x minibatches x gradient-accumulation micro-batches as nested `lax.scan`
     (purejaxrl style), clip-by-global-norm + AdamW on a cosine schedule
  -> KL controller update, metrics (JSONL + progress bar), orbax checkpoint.
Log-probs (rollout, reference, update) are under logits / sampling temperature: the distribution the tokens were
sampled from (before top-k/top-p filtering), as the sampler reports them.
Sharding: parameters FSDP-sharded and batches split over a (`data`, `fsdp`) mesh (nn/sharding.py); the jitted
functions constrain their outputs to the same shardings, so the state keeps its layout from step to step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from posi_jax.checkpoints import PPO_RUN_CONFIG
from posi_jax.errors import PosiError
from posi_jax.models.llama import LlamaForCausalLM, LlamaValueModel, ValueHead
from posi_jax.nn import sharding as shd
from posi_jax.nn.linear import Linear
from posi_jax.nn.lora import BASE_PARAMS, LoRAParam, add_lora, merge_lora
from posi_jax.reward.posi import RewardConfig
from posi_jax.rl import ppo
from posi_jax.rl.kl import make_kl_controller
from posi_jax.rl.sampler import SamplingConfig, generate

RewardFn = Callable[[list[str], list[str]], Any]  # (rewritten, original) -> scores [B] (or an object with .reward)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class LoRASettings:
    """The adapter PPO trains. An SFT adapter on the loaded policy is first merged into the base weights (in place),
    so the frozen base *is* the SFT policy: the reference (base without the PPO adapter) is the SFT model, as the KL
    term needs, and the fresh PPO adapter (B = 0) starts the policy exactly there (KL = 0 at iteration 1).

    Adapters are built without dropout: PPO's ratio needs the rollout and the update to score tokens identically.
    """

    enabled: bool = True  # false: full fine-tuning (an adapter found on the loaded policy is merged first)
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0


@dataclass(frozen=True)
class PPOSettings:
    batch_size: int = 16  # prompts (rollouts) per iteration
    mini_batch_size: int = 4  # rows per optimizer step
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (mini_batch_size / this rows each)
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    kl_penalty: str = "k1"  # k1 | k3 | abs | mse (rl/ppo.py kl_penalty)
    adaptive_kl: bool = True
    init_kl_coef: float = 0.2
    kl_target: float = 0.02  # POSI's ppo_target
    kl_horizon: float = 10000.0
    logprob_chunk_size: int = 0  # rows of the [rows, vocab] log-softmax at a time (0: all at once)

    def __post_init__(self):
        if self.kl_penalty not in ppo.KL_KINDS:
            raise PosiError(f"ppo.kl_penalty: {self.kl_penalty!r} is not one of {', '.join(ppo.KL_KINDS)}")
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise PosiError(f"ppo.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise PosiError(f"ppo.batch_size {self.batch_size} is not a multiple of mini_batch_size "
                            f"{self.mini_batch_size}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise PosiError(f"ppo.mini_batch_size {self.mini_batch_size} is not a multiple of "
                            f"gradient_accumulation_steps {self.gradient_accumulation_steps}")

    @property
    def num_minibatches(self) -> int:
        return self.batch_size // self.mini_batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.gradient_accumulation_steps


@dataclass(frozen=True)
class OptimSettings:
    learning_rate: float = 1.9e-5
    schedule: str = "cosine"  # cosine (to 0 over the run, after warmup) | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise PosiError(f"optim.schedule: {self.schedule!r} is not cosine or constant")


def _lr_schedule(count, learning_rate, total_steps, warmup_steps, cosine: bool):
    """Linear warmup from 0, then constant or cosine decay to 0 at `total_steps` (all traced except `cosine`)."""
    count = jnp.asarray(count, jnp.float32)
    warm = jnp.where(warmup_steps > 0, jnp.minimum(count / jnp.maximum(warmup_steps, 1.0), 1.0), 1.0)
    if not cosine:
        return learning_rate * warm
    progress = jnp.clip((count - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1.0), 0.0, 1.0)
    return learning_rate * jnp.where(count < warmup_steps, warm, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))


def _adamw(learning_rate, total_steps, warmup_steps, weight_decay, *, cosine, b1, b2, eps, max_grad_norm):
    def lr(count):
        return _lr_schedule(count, learning_rate, total_steps, warmup_steps, cosine)

    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


@functools.lru_cache(maxsize=16)
def _optimizer(cosine: bool, b1: float, b2: float, eps: float, max_grad_norm: float) -> optax.GradientTransformation:
    # The numbers that differ between runs (learning rate, run length, warmup, weight decay) live in the optimizer
    # state (inject_hyperparams), so one compiled update serves them all; the values here are placeholders.
    return optax.inject_hyperparams(_adamw, static_args=("cosine", "b1", "b2", "eps", "max_grad_norm"))(
        learning_rate=0.0, total_steps=1.0, warmup_steps=0.0, weight_decay=0.0, cosine=cosine, b1=b1, b2=b2, eps=eps,
        max_grad_norm=max_grad_norm)


def make_optimizer(cfg: OptimSettings, total_steps: int):
    """(tx, init): clip-by-global-norm + AdamW on the configured schedule; `init(params)` gives its state."""
    tx = _optimizer(cfg.schedule == "cosine", cfg.b1, cfg.b2, cfg.eps, cfg.max_grad_norm)

    def init(params):
        state = tx.init(params)
        values = {"learning_rate": cfg.learning_rate, "total_steps": float(total_steps),
                  "warmup_steps": float(cfg.warmup_steps), "weight_decay": cfg.weight_decay}
        return state._replace(hyperparams={k: jnp.asarray(values[k], v.dtype) for k, v in state.hyperparams.items()})

    return tx, init


# ---------------------------------------------------------------------------------------------------------------------
# Models: graph definitions plus trainable / frozen parameter trees


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, Linear) and m.lora is not None for _, m in nnx.iter_graph(model))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@dataclass(frozen=True)
class PPOModels:
    """How to run policy, reference and value from (trainable, frozen) parameter trees. Hashable, holds no arrays.

    trainable = {"policy": adapter or full weights, "value": value-model parameters (head, plus its own adapter or
    trunk unless shared)}; frozen = base weights (LoRA: shared by policy, reference and value) or the reference copy.
    """

    policy_def: Any  # graphdef of the policy (with adapters when lora)
    reference_def: Any  # graphdef of the policy without adapters
    value_def: Any  # graphdef of LlamaValueModel, or of ValueHead when shared
    lora: bool
    shared_backbone: bool

    def policy(self, trainable, frozen) -> LlamaForCausalLM:
        if self.lora:
            return nnx.merge(self.policy_def, trainable["policy"], frozen)
        return nnx.merge(self.policy_def, trainable["policy"])

    def reference(self, frozen) -> LlamaForCausalLM:
        return nnx.merge(self.reference_def, frozen)

    def forward(self, trainable, frozen, tokens, mask, start: int, stop: int):
        """Policy logits [B, stop-start, V] (fp32) and values [B, stop-start] at positions start..stop-1."""
        policy = self.policy(trainable, frozen)
        hidden, _ = policy.hidden_states(tokens, attention_mask=mask)
        hidden = hidden[:, start:stop]
        if self.shared_backbone:
            values = nnx.merge(self.value_def, trainable["value"])(hidden)
        else:
            value_frozen = nnx.State({"trunk": frozen}) if self.lora else nnx.State({})
            value_model = nnx.merge(self.value_def, trainable["value"], value_frozen)
            values = value_model(tokens, attention_mask=mask)[:, start:stop]
        return policy.logits(hidden), values

    def reference_logits(self, frozen, tokens, mask, start: int, stop: int):
        reference = self.reference(frozen)
        hidden, _ = reference.hidden_states(tokens, attention_mask=mask)
        return reference.logits(hidden[:, start:stop])


def split_policy(policy: LlamaForCausalLM, lora: LoRASettings = LoRASettings()):
    """(policy_def, trainable policy tree, base) of the PPO policy built from the SFT policy, in place: an SFT adapter
    is merged; with LoRA a fresh PPO adapter is added and base = the frozen weights, in full mode base is None."""
    if has_lora(policy):
        merge_lora(policy)  # the SFT adapter becomes part of the frozen SFT weights (see LoRASettings)
    if not lora.enabled:
        policy_def, weights = nnx.split(policy, nnx.Param)
        return policy_def, weights, None
    add_lora(policy, lora.targets, rank=lora.rank, alpha=lora.alpha, dropout=0.0, seed=lora.seed)
    policy_def, adapter, base = nnx.split(policy, LoRAParam, BASE_PARAMS)
    # fp32 master copy of the (small) adapter whatever the base's dtype; Linear casts it to the compute dtype.
    return policy_def, jax.tree.map(lambda x: x.astype(jnp.float32), adapter), base


def build_models(policy: LlamaForCausalLM, lora: LoRASettings = LoRASettings(), shared_backbone: bool = False):
    """(PPOModels, trainable, frozen) from the SFT policy. Consumes `policy` (adapters are merged/added in place)."""
    policy_def, trainable_policy, frozen = split_policy(policy, lora)
    if lora.enabled:
        reference_def = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(
            policy.config, dtype=policy.dtype, param_dtype=jax.tree.leaves(frozen)[0].dtype)))[0]
    else:
        frozen = _copy(trainable_policy)
        reference_def = policy_def

    head = ValueHead(policy.config.hidden_size, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    if shared_backbone:
        value_def, value_params = nnx.split(head)
    else:
        # LlamaValueModel's structure with the policy's graph (same adapters) as trunk, without allocating a trunk.
        value_model = nnx.eval_shape(lambda: LlamaValueModel(policy.config, dtype=policy.dtype))
        value_model.trunk = nnx.merge(policy_def, trainable_policy, frozen) if lora.enabled \
            else nnx.merge(policy_def, trainable_policy)
        value_model.value_head = head
        if lora.enabled:
            value_def, value_params, _ = nnx.split(value_model, nnx.Any(LoRAParam, nnx.PathContains("value_head")),
                                                   ...)
        else:
            value_def, value_params = nnx.split(value_model, nnx.Param)
        value_params = _copy(value_params)  # initialised from the SFT weights, trained separately
    models = PPOModels(policy_def, reference_def, value_def, lora.enabled, shared_backbone)
    return models, {"policy": trainable_policy, "value": value_params}, frozen


# ---------------------------------------------------------------------------------------------------------------------
# Rollout batch and the jitted pieces


class Rollout(NamedTuple):
    prompt_ids: jax.Array  # [B, P] int32, left padded
    prompt_mask: jax.Array  # [B, P] bool
    response: jax.Array  # [B, N] int32
    response_mask: jax.Array  # [B, N] bool
    logprobs: jax.Array  # [B, N] fp32, the policy's at rollout time
    values: jax.Array  # [B, N] fp32
    advantages: jax.Array  # [B, N] fp32, whitened
    returns: jax.Array  # [B, N] fp32


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
def score_rollout(spec: StepSpec, params, frozen, prompt_ids, prompt_mask, response, response_mask, scores, kl_coef):
    """Old log-probs, values, reference log-probs, KL-penalised rewards, GAE and whitened advantages of a rollout."""
    c = spec.ppo
    tokens, mask, start, stop = _sequence(prompt_ids, prompt_mask, response, response_mask)
    params, frozen = spec.gathered(params), spec.gathered(frozen)
    logits, values = spec.models.forward(params, frozen, tokens, mask, start, stop)
    logprobs, entropy = spec.logprobs(logits, response)
    ref_logprobs, _ = spec.logprobs(spec.models.reference_logits(frozen, tokens, mask, start, stop), response)
    rewards, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, c.kl_penalty)
    advantages, returns = ppo.gae_advantages(rewards, values, response_mask, c.gamma, c.lam)
    whitened = ppo.masked_whiten(advantages, response_mask)
    rollout = Rollout(prompt_ids, prompt_mask, response, response_mask, logprobs, values, whitened, returns)
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


def ppo_minibatch_loss(spec: StepSpec, params, frozen, mb: Rollout):
    c = spec.ppo
    tokens, mask, start, stop = _sequence(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask)
    logits, values = spec.models.forward(spec.gathered(params), spec.gathered(frozen), tokens, mask, start, stop)
    logprobs, entropy = spec.logprobs(logits, mb.response)
    return ppo.ppo_loss(logprobs, mb.logprobs, mb.advantages, values, mb.values, mb.returns, mb.response_mask,
                        entropy, c.cliprange, c.cliprange_value, c.vf_coef, c.ent_coef)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def ppo_update(spec: StepSpec, state: TrainState, frozen, rollout: Rollout, rng):
    """`ppo_epochs` x minibatches x accumulation micro-batches as nested lax.scan; returns (state, mean metrics)."""
    c = spec.ppo
    grad_fn = jax.value_and_grad(functools.partial(ppo_minibatch_loss, spec), has_aux=True)
    layout = (c.num_minibatches, c.gradient_accumulation_steps, c.micro_batch_size)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry

        def micro_step(grad_sum, micro):
            (_, metrics), grads = grad_fn(params, frozen, micro)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        grad_sum, metrics = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), minibatch)
        grads = jax.tree.map(lambda g: g / c.gradient_accumulation_steps, grad_sum)
        metrics = dict(_tree_mean(metrics), grad_norm=optax.tree.norm(grads))
        updates, opt_state = spec.tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch_step(carry, epoch_rng):
        order = jax.random.permutation(epoch_rng, c.batch_size)
        shuffled = jax.tree.map(lambda x: spec.rows(x[order].reshape(*layout, *x.shape[1:]), leading_axes=2), rollout)
        return jax.lax.scan(minibatch_step, carry, shuffled)

    (params, opt_state), metrics = jax.lax.scan(epoch_step, (state.params, state.opt_state),
                                                jax.random.split(rng, c.ppo_epochs))
    new_state = state._replace(params=params, opt_state=opt_state)
    new_state = jax.lax.with_sharding_constraint(new_state, spec.state_shardings(new_state))
    return new_state, {f"ppo/{k}": v for k, v in _tree_mean(metrics).items()}


class PPOTrainer:
    """Owns the jitted functions; the loop (`run`) and checkpointing are thin Python around them.

    `tokenizer` is a posi_jax Tokenizer: prompts go through the rewriter's chat formatting, responses through its
    cleaning (`lm_codec`). `reward_fn(rewritten, original)` returns scores [B] (or an object with a `.reward` field
    and other per-prompt fields, logged as reward components).
    """

    def __init__(self, policy: LlamaForCausalLM, tokenizer, *, reward_fn: RewardFn, prompts: list[str],
                 ppo_cfg: PPOSettings = PPOSettings(),
                 optim: OptimSettings = OptimSettings(), sampling: SamplingConfig = SamplingConfig(),
                 lora: LoRASettings = LoRASettings(), shared_backbone: bool = False, iterations: int = 100,
                 seed: int = 0, mesh=None, max_prompt_tokens: int = 256, prompt_length: int | None = None):
        if not prompts:
            raise PosiError("PPO needs at least one prompt")
        self.cfg, self.optim_cfg, self.sampling = ppo_cfg, optim, sampling
        self.reward_fn, self.tokenizer = reward_fn, tokenizer
        encode, self.decode = lm_codec(tokenizer, max_prompt_tokens)
        self.eos_ids, self.pad_id = tuple(int(e) for e in tokenizer.eos_ids), int(tokenizer.pad_id)
        self.iterations, self.seed = iterations, seed
        self.mesh = shd.make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
        shd.check_batch(ppo_cfg.batch_size, self.mesh, "ppo.batch_size")
        shd.check_batch(ppo_cfg.micro_batch_size, self.mesh, "the micro-batch (mini_batch_size / accumulation)")
        self.prompts = list(prompts)
        self.prompt_rows = [list(r) for r in encode(self.prompts)]
        longest = max(len(r) for r in self.prompt_rows)
        self.prompt_length = prompt_length or -(-longest // 8) * 8  # one compiled shape for the whole run
        if longest > self.prompt_length:
            raise PosiError(f"a prompt has {longest} tokens, more than prompt_length {self.prompt_length}")
        limit = policy.config.max_position_embeddings
        if self.prompt_length + sampling.max_new_tokens > limit:
            raise PosiError(f"prompt_length {self.prompt_length} + max_new_tokens {sampling.max_new_tokens} exceed the "
                            f"policy's context of {limit}")
        self.kl_ctl = make_kl_controller(ppo_cfg.adaptive_kl, ppo_cfg.init_kl_coef, ppo_cfg.kl_target,
                                         ppo_cfg.kl_horizon)
        self.total_updates = iterations * ppo_cfg.ppo_epochs * ppo_cfg.num_minibatches
        self.tx, init_optimizer = make_optimizer(optim, self.total_updates)

        self.models, trainable, frozen = build_models(policy, lora, shared_backbone)
        temperature = 1.0 if sampling.greedy else float(sampling.temperature)
        self.spec = StepSpec(self.models, ppo_cfg, temperature, self.tx, self.mesh)
        self.frozen = shd.put(frozen, shd.param_shardings(frozen, self.mesh))
        state = TrainState(trainable, init_optimizer(trainable), self.kl_ctl.init(), jax.random.PRNGKey(seed),
                           jnp.int32(0))
        self.state_shardings = self.spec.state_shardings(state)
        self.state = shd.put(state, self.state_shardings)
        self.batch_sharding = shd.batch_sharding(self.mesh)

    # ---- one iteration ---------------------------------------------------------------------------------------------
    def batch_prompts(self, iteration: int) -> list[int]:
        """Prompt indices of an iteration: a fresh seeded permutation per pass over the data (resumable)."""
        b, n = self.cfg.batch_size, len(self.prompts)
        out: list[int] = []
        position = iteration * b
        while len(out) < b:
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = order[offset: offset + b - len(out)]
            out.extend(int(i) for i in take)
            position += len(take)
        return out

    def policy_model(self) -> LlamaForCausalLM:
        """The current policy as a module (views of the trainer's arrays, no copy)."""
        return self.models.policy(self.state.params, self.frozen)

    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its metrics."""
        state = self.state
        iteration = int(state.iteration)
        indices = self.batch_prompts(iteration)
        originals = [self.prompts[i] for i in indices]
        ids, mask = self.tokenizer.pad_left([self.prompt_rows[i] for i in indices], self.prompt_length)
        ids, mask = shd.put((ids, mask), (self.batch_sharding, self.batch_sharding))
        rng, gen_rng, update_rng = jax.random.split(state.rng, 3)

        t0 = time.perf_counter()
        gen = generate(self.policy_model(), ids, mask, gen_rng, self.sampling, eos_ids=self.eos_ids,
                       pad_id=self.pad_id)
        tokens, keep = shd.to_host(gen.tokens), shd.to_host(gen.mask)
        t_rollout = time.perf_counter() - t0
        rewritten = [self.decode(tokens[j], keep[j]) for j in range(len(indices))]

        t0 = time.perf_counter()
        scores, components = reward_arrays(self.reward_fn(rewritten, originals), len(indices))
        t_reward = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores_dev = shd.put(jnp.asarray(scores, jnp.float32), self.batch_sharding)
        rollout, stats = score_rollout(self.spec, state.params, self.frozen, ids, mask, gen.tokens, gen.mask,
                                       scores_dev, state.kl_coef)
        new_state, update_metrics = ppo_update(self.spec, state, self.frozen, rollout, update_rng)
        kl_coef = self.kl_ctl.update(new_state.kl_coef, stats["objective/kl"], self.cfg.batch_size)
        self.state = new_state._replace(kl_coef=kl_coef, rng=rng, iteration=new_state.iteration + 1)
        metrics = {k: float(v) for k, v in {**stats, **update_metrics}.items()}
        t_update = time.perf_counter() - t0

        n_tokens = int(keep.sum())
        metrics.update({
            "iteration": iteration + 1,
            "reward/mean": float(np.mean(scores)), "reward/std": float(np.std(scores)),
            **{f"reward/{k}_mean": float(np.mean(v)) for k, v in components.items()},
            "response/length_mean": n_tokens / len(indices),
            "time/rollout_s": t_rollout, "time/reward_s": t_reward, "time/update_s": t_update,
            "time/rollout_tokens_per_s": n_tokens / max(t_rollout, 1e-9),
            "time/tokens_per_s": n_tokens / max(t_rollout + t_reward + t_update, 1e-9),
        })
        self.last_texts = list(zip(originals, rewritten))
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save(self, run_dir: str | Path, extra: dict | None = None, keep: int | None = None) -> None:
        """Checkpoint the whole train state (params, optimizer, KL coefficient, RNG, iteration) as step = iteration."""
        from posi_jax import train_state

        step = int(self.state.iteration)
        train_state.save(run_dir, step, _checkpoint_items(self.state), {"iteration": step, **(extra or {})}, keep=keep)

    def restore(self, run_dir: str | Path) -> int | None:
        """Restore the latest checkpoint of `run_dir` onto this trainer's shardings; its iteration, or None."""
        from posi_jax import train_state

        step = train_state.latest_step(run_dir)
        if step is None:
            return None
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                                self.state_shardings)
        items, _ = train_state.restore(run_dir, step, _checkpoint_items(abstract))
        self.state = shd.put(TrainState(items["params"], items["opt_state"], **items["scalars"]), self.state_shardings)
        return step


def _checkpoint_items(state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state,
            "scalars": {"kl_coef": state.kl_coef, "rng": state.rng, "iteration": state.iteration}}


def reward_arrays(out, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(scores [B], components) from a reward function's return value: an array, or an object with `.reward`."""
    components: dict[str, np.ndarray] = {}
    if hasattr(out, "reward"):
        fields = out._asdict() if hasattr(out, "_asdict") else (
            dataclasses.asdict(out) if dataclasses.is_dataclass(out) else vars(out))
        for name, value in fields.items():
            if name == "reward":
                continue
            arr = np.asarray(value) if isinstance(value, (np.ndarray, jax.Array, list, tuple)) else None
            if arr is not None and arr.shape == (batch,) and np.issubdtype(arr.dtype, np.number):
                components[name] = arr.astype(np.float64)
        out = out.reward
    scores = np.asarray(out, np.float32)
    if scores.shape != (batch,):
        raise PosiError(f"the reward function returned shape {scores.shape} for {batch} prompts; expected ({batch},)")
    if not np.all(np.isfinite(scores)):
        raise PosiError(f"the reward function returned non-finite scores: {scores.tolist()}")
    return scores, components


# ---------------------------------------------------------------------------------------------------------------------
# Text <-> tokens for an LM tokenizer, and the run loop


def lm_codec(tokenizer, max_prompt_tokens: int = 256):
    """(encode, decode) through the rewriter's chat formatting (one home for the template and response cleaning)."""
    from posi_jax.rewriter import Rewriter, clean_response

    formatter = Rewriter(None, tokenizer, max_prompt_tokens=max_prompt_tokens)

    def encode(prompts):
        return [formatter.chat_tokens(p) for p in prompts]

    def decode(tokens, mask):
        kept = [int(t) for t, k in zip(tokens, mask) if k and int(t) not in tokenizer.eos_ids]
        return clean_response(tokenizer.decode(kept))

    return encode, decode


def run(trainer: PPOTrainer, output_dir: str | Path, *, save_every: int = 10, resume: bool = False,
        extra: dict | None = None, keep: int | None = 3, progress: bool = True, log_texts: int = 2) -> list[dict]:
    """Train until `trainer.iterations`, appending metrics to output_dir/metrics.jsonl; checkpoints under
    output_dir/checkpoints (train_state layout). With `resume`, continue from the latest checkpoint exactly (state,
    RNG, data order: the prompts of iteration i are a function of the seed and i)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    start = 0
    if resume:
        restored = trainer.restore(output_dir)
        if restored is None:
            raise PosiError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}")
        start = restored
        if hasattr(trainer.reward_fn, "_calls"):
            # PosiReward's per_call noise is keyed by its call count: one call per iteration, so continue from there.
            trainer.reward_fn._calls = start
        if metrics_path.is_file():  # drop lines logged after the checkpoint (they will be redone)
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= start]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    elif metrics_path.exists():
        metrics_path.unlink()
    history = []
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=trainer.iterations, initial=start, unit="it", desc="ppo")
    for iteration in range(start, trainer.iterations):
        metrics = trainer.step()
        history.append(metrics)
        if jax.process_index() == 0:
            record = dict(metrics)
            if log_texts:
                record["samples"] = [{"original": o, "rewritten": r} for o, r in trainer.last_texts[:log_texts]]
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        done = iteration + 1
        if done % save_every == 0 or done == trainer.iterations:
            trainer.save(output_dir, extra, keep=keep)
    if bar is not None:
        bar.close()
    return history


# ---------------------------------------------------------------------------------------------------------------------
# A run from a config file (python -m posi_jax.ppo)


@dataclass(frozen=True)
class PolicySettings:
    # posi_jax.checkpoints.load_policy: null = the embedded SmolLM2-135M-Instruct with the shipped SFT adapter (the
    # base alone, with a warning, if the adapter is absent); an adapter folder; an SFT run folder; a .gguf; an HF folder.
    checkpoint: str | None = None
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"


@dataclass(frozen=True)
class RewardSettings:
    kind: str = "posi"  # posi: real SD + CLIPs from the paths below | tiny_random: in-memory random tiny models
    sd_folder: str = ""  # diffusers SD v1.4 folder
    q16_clip: str = ""  # CLIP ViT-L/14 checkpoint (Q16's image encoder)
    clip: str = ""  # CLIP ViT-B/32 checkpoint (alignment score)
    q16_prompts: str = "../shared/data/posi/q16_prompts.p"
    weights_seed: int = 0  # tiny_random only
    dtype: str = "float32"
    config: RewardConfig = RewardConfig()  # w, cap, images_per_prompt, steps, guidance_scale, seed_policy, ...

    def __post_init__(self):
        if self.kind not in ("posi", "tiny_random"):
            raise PosiError(f"reward.kind {self.kind!r}: choose posi or tiny_random")


@dataclass(frozen=True)
class MeshSettings:
    data: int = -1  # -1: all devices not used by fsdp
    fsdp: int = 1


@dataclass(frozen=True)
class PPORunConfig:
    policy: PolicySettings = PolicySettings()
    lora: LoRASettings = LoRASettings()
    shared_value_backbone: bool = False
    sampling: SamplingConfig = SamplingConfig()
    ppo: PPOSettings = PPOSettings()
    optim: OptimSettings = OptimSettings()
    reward: RewardSettings = RewardSettings()
    mesh: MeshSettings = MeshSettings()
    prompts: str = "../shared/data/posi/ppo_prompts.json"
    max_prompts: int = 0  # use only the first N prompts (0: all)
    max_prompt_tokens: int = 256  # longer user prompts are truncated (with a warning)
    iterations: int = 100
    seed: int = 0
    out_dir: str = "runs/ppo"
    save_every: int = 10
    keep_checkpoints: int = 3
    distributed: bool = False  # jax.distributed.initialize() first (multi-host TPU VMs)


def load_run_config(path=None, overrides=None) -> PPORunConfig:
    from posi_jax.config import load_config

    try:
        return load_config(PPORunConfig, path, overrides)
    except ValueError as e:  # SamplingConfig validates with ValueError
        raise PosiError(f"config: {e}") from None


def _dtype(name: str, where: str):
    if name not in ("float32", "bfloat16"):
        raise PosiError(f"{where}: dtype {name!r} must be float32 or bfloat16")
    return jnp.dtype(name)


def build_reward(settings: RewardSettings, mesh=None):
    from posi_jax.reward.q16 import load_q16_prompts

    if settings.kind == "tiny_random":
        from posi_jax.reward.tiny_random import tiny_random_reward

        prompts = load_q16_prompts(settings.q16_prompts) if settings.q16_prompts else None
        return tiny_random_reward(settings.config, seed=settings.weights_seed, q16_prompts=prompts, mesh=mesh)
    from posi_jax.reward.posi import PosiReward

    missing = [k for k in ("sd_folder", "q16_clip", "clip") if not getattr(settings, k)]
    if missing:
        raise PosiError(f"reward.kind posi needs reward.{', reward.'.join(missing)} (paths to the checkpoints)")
    return PosiReward.from_paths(settings.sd_folder, settings.q16_clip, settings.q16_prompts, settings.clip,
                                 settings.config, dtype=_dtype(settings.dtype, "reward.dtype"),
                                 mesh="auto" if mesh is None else mesh)


def trainer_from_config(cfg: PPORunConfig, reward_fn: RewardFn | None = None) -> PPOTrainer:
    from posi_jax.checkpoints import load_policy
    from posi_jax.data import load_prompts

    if cfg.distributed:
        jax.distributed.initialize()
    prompts = load_prompts(cfg.prompts)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    policy, tokenizer = load_policy(cfg.policy.checkpoint, dtype=_dtype(cfg.policy.dtype, "policy.dtype"),
                                    param_dtype=_dtype(cfg.policy.param_dtype, "policy.param_dtype"))
    if reward_fn is None:
        reward_mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)) if jax.device_count() > 1 else None
        reward_fn = build_reward(cfg.reward, reward_mesh)
    return PPOTrainer(policy, tokenizer, reward_fn=reward_fn, prompts=prompts, ppo_cfg=cfg.ppo, optim=cfg.optim,
                      sampling=cfg.sampling, lora=cfg.lora, shared_backbone=cfg.shared_value_backbone,
                      iterations=cfg.iterations, seed=cfg.seed, mesh=mesh, max_prompt_tokens=cfg.max_prompt_tokens)


def train(cfg: PPORunConfig, *, resume: bool = False, reward_fn: RewardFn | None = None,
          progress: bool = True) -> dict:
    """Build everything from the config, train, and return a summary (also written as out_dir/summary.json)."""
    from posi_jax.config import to_dict

    t0 = time.perf_counter()
    trainer = trainer_from_config(cfg, reward_fn)
    t_setup = time.perf_counter() - t0
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = to_dict(cfg)
    (out_dir / PPO_RUN_CONFIG).write_text(json.dumps(config_dict, indent=2, default=str))
    t0 = time.perf_counter()
    history = run(trainer, out_dir, save_every=cfg.save_every, resume=resume, keep=cfg.keep_checkpoints,
                  progress=progress)
    summary = {"iterations": int(trainer.state.iteration), "iterations_this_run": len(history),
               "setup_s": round(t_setup, 2), "train_s": round(time.perf_counter() - t0, 2),
               "out_dir": str(out_dir), "checkpoint_step": int(trainer.state.iteration)}
    if history:
        summary.update({k: history[-1][k] for k in ("reward/mean", "objective/kl", "objective/kl_coef")})
        summary["reward/mean_first"] = history[0]["reward/mean"]
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# A finished (or interrupted) run as a rewriter: posi_jax.checkpoints.load_policy(run_dir), python -m posi_jax.ppo export


def read_run_config(run_dir) -> PPORunConfig:
    """The PPORunConfig a run was trained with (run_dir/ppo_config.json, written by `train`)."""
    from posi_jax.config import from_dict

    path = Path(run_dir) / PPO_RUN_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PosiError(f"{path}: cannot read the PPO run config ({e})") from None
    try:
        return from_dict(PPORunConfig, data)
    except ValueError as e:
        raise PosiError(f"{path}: {e}") from None


def load_run_policy(run_dir, step: int | None = None, *, dtype=None, param_dtype=None):
    """(policy, tokenizer) of a PPO run folder: the run's SFT policy (`policy.checkpoint`, an SFT adapter merged) with
    the policy parameters of checkpoint `step` (None: the latest): its PPO adapter, or all weights when lora is off.
    The model is in eval mode; the adapter is kept (fold it with nn.lora.merge_lora). dtypes default to the run's."""
    from posi_jax import train_state
    from posi_jax.checkpoints import load_policy

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if step is None:
        step = train_state.latest_step(run_dir)
        if step is None:
            raise PosiError(f"{run_dir}: PPO run has no checkpoint under {run_dir / 'checkpoints'} (a run saves one "
                            f"every save_every={cfg.save_every} iterations and at its end)")
    policy, tokenizer = load_policy(cfg.policy.checkpoint,
                                    dtype=dtype or _dtype(cfg.policy.dtype, "policy.dtype"),
                                    param_dtype=param_dtype or _dtype(cfg.policy.param_dtype, "policy.param_dtype"))
    # The checkpoint's trainable tree {"policy", "value"} as shapes only (nothing allocated for the value model).
    graphdef, weights = nnx.split(policy)
    abstract = jax.eval_shape(
        lambda w: build_models(nnx.merge(graphdef, w), cfg.lora, cfg.shared_value_backbone)[1], weights)
    items, _ = train_state.restore(run_dir, step, {"params": abstract})
    policy_def, _, base = split_policy(policy, cfg.lora)
    trained = jax.tree.map(jnp.asarray, items["params"]["policy"])
    model = nnx.merge(policy_def, trained, base) if cfg.lora.enabled else nnx.merge(policy_def, trained)
    model.eval()
    return model, tokenizer
