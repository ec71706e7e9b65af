"""The PPO models as views of one set of arrays: graph definitions plus trainable / frozen parameter trees.

- policy: the SFT LLaMA, trained through its LoRA adapter (default) or in full;
- reference: the frozen SFT policy. With LoRA it is the base weights run without the adapter (the policy's own frozen
  arrays under the adapter-free graph), so no second copy of the weights exists; in full mode it is a frozen copy;
- value: `LlamaValueModel`, a trunk initialised from the SFT policy plus a scalar head. Separate parameters by default
  (with LoRA: its own copy of the adapter over the *shared* frozen base), or with `shared_backbone` a head on the
  policy's own hidden states (TRL's `AutoModelForCausalLMWithValueHead`, which upstream POSI uses).

Dropout (LoRA's, `LoRASettings.dropout`, and the value head's, `ValueHeadSettings.dropout`; both 0 by default) is
active while scoring and updating and never while sampling, as upstream runs TRL. Its keys live in a small `dropout`
tree (the adapters' nnx RNG streams), re-keyed for every forward pass from a key the caller passes (`reseed`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.models.llama import LlamaForCausalLM, LlamaValueModel, ValueHead
from posi_jax.nn.dropout import keep_mask
from posi_jax.nn.linear import Linear
from posi_jax.nn.lora import BASE_PARAMS, LoRAParam, add_lora, merge_lora
from posi_jax.rl.config import LoRASettings, ValueHeadSettings


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, Linear) and m.lora is not None for _, m in nnx.iter_graph(model))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def reseed(dropout_state, key):
    """The dropout RNG streams re-keyed for one forward pass: every stream's key folded with `key`, counts reset.
    Pure: the same (state, key) gives the same masks, so a resumed run repeats them."""
    if key is None or not jax.tree.leaves(dropout_state):
        return dropout_state
    salt = jax.random.bits(key, (), jnp.uint32)

    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, salt)
        return jnp.zeros_like(x)

    return jax.tree.map(one, dropout_state)


def _dropout(x: jax.Array, key, rate: float) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    return jnp.where(keep_mask(key, x.shape, rate), x / (1.0 - rate), jnp.zeros_like(x))


@dataclass(frozen=True)
class PPOModels:
    """How to run policy, reference and value from (trainable, frozen, dropout) trees. Hashable, holds no arrays.

    trainable = {"policy": adapter or full weights, "value": value-model parameters (head, plus its own adapter or
    trunk unless shared)}; frozen = base weights (LoRA: shared by policy, reference and value) or the reference copy;
    dropout = {"policy", "value"} RNG streams of the adapters' dropout (empty without dropout).
    """

    policy_def: Any  # graphdef of the policy (with adapters when lora; dropout on)
    sample_def: Any  # the same graph with dropout off: rollouts
    reference_def: Any  # graphdef of the policy without adapters
    value_def: Any  # graphdef of LlamaValueModel, or of ValueHead when shared
    lora: bool
    shared_backbone: bool
    value_head_dropout: float = 0.0

    def _policy(self, graphdef, trainable, frozen, dropout):
        if self.lora:
            return nnx.merge(graphdef, trainable["policy"], frozen, dropout["policy"])
        return nnx.merge(graphdef, trainable["policy"])

    def policy(self, trainable, frozen, dropout=None) -> LlamaForCausalLM:
        """The policy as rollouts run it (dropout off)."""
        return self._policy(self.sample_def, trainable, frozen, dropout or _NO_DROPOUT)

    def reference(self, frozen) -> LlamaForCausalLM:
        return nnx.merge(self.reference_def, frozen)

    def forward(self, trainable, frozen, tokens, mask, start: int, stop: int, dropout=None, key=None):
        """Policy logits [B, stop-start, V] (fp32) and values [B, stop-start] at positions start..stop-1, with dropout
        (if any) keyed by `key` (no dropout when `key` is None)."""
        dropout = dropout or _NO_DROPOUT
        graphdef, head_key = self.sample_def, None
        if key is not None:
            graphdef = self.policy_def
            policy_key, value_key, head_key = jax.random.split(key, 3)
            dropout = {"policy": reseed(dropout["policy"], policy_key), "value": reseed(dropout["value"], value_key)}
        policy = self._policy(graphdef, trainable, frozen, dropout)
        hidden, _ = policy.hidden_states(tokens, attention_mask=mask)
        hidden = hidden[:, start:stop]
        if self.shared_backbone:
            values = nnx.merge(self.value_def, trainable["value"])(_dropout(hidden, head_key, self.value_head_dropout))
        else:
            value_frozen = nnx.State({"trunk": frozen}) if self.lora else nnx.State({})
            if self.lora:
                value_model = nnx.merge(self.value_def, trainable["value"], dropout["value"], value_frozen)
            else:
                value_model = nnx.merge(self.value_def, trainable["value"])
            if key is None:
                value_model.eval()
            value_hidden, _ = value_model.trunk.hidden_states(tokens, attention_mask=mask)
            values = value_model.value_head(_dropout(value_hidden[:, start:stop], head_key, self.value_head_dropout))
        return policy.logits(hidden), values

    def reference_logits(self, frozen, tokens, mask, start: int, stop: int):
        reference = self.reference(frozen)
        hidden, _ = reference.hidden_states(tokens, attention_mask=mask)
        return reference.logits(hidden[:, start:stop])


_NO_DROPOUT = {"policy": nnx.State({}), "value": nnx.State({})}


def _prepare(policy: LlamaForCausalLM, lora: LoRASettings, dropout: float):
    if has_lora(policy):
        merge_lora(policy)  # the SFT adapter becomes part of the frozen SFT weights (see LoRASettings)
    if lora.enabled:
        add_lora(policy, lora.targets, rank=lora.rank, alpha=lora.alpha, dropout=dropout, seed=lora.seed)


def _master(adapter):
    # fp32 master copy of the (small) adapter whatever the base's dtype; Linear casts it to the compute dtype.
    return jax.tree.map(lambda x: x.astype(jnp.float32), adapter)


def split_policy(policy: LlamaForCausalLM, lora: LoRASettings = LoRASettings()):
    """(policy_def, trainable policy tree, base) of the PPO policy built from the SFT policy, in place, for inference
    (adapters without dropout): an SFT adapter is merged; with LoRA a fresh PPO adapter is added and base = the frozen
    weights, in full mode base is None."""
    _prepare(policy, lora, 0.0)
    if not lora.enabled:
        policy_def, weights = nnx.split(policy, nnx.Param)
        return policy_def, weights, None
    policy_def, adapter, base = nnx.split(policy, LoRAParam, BASE_PARAMS)
    return policy_def, _master(adapter), base


def _value_head(hidden_size: int, settings: ValueHeadSettings) -> ValueHead:
    head = ValueHead(hidden_size, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    if settings.init == "torch_default":  # torch.nn.Linear's init: kernel and bias uniform in ±1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(hidden_size)
        k_kernel, k_bias = jax.random.split(jax.random.key(settings.seed))
        head.summary.kernel[...] = jax.random.uniform(k_kernel, (hidden_size, 1), jnp.float32, -bound, bound)
        head.summary.bias[...] = jax.random.uniform(k_bias, (1,), jnp.float32, -bound, bound)
    return head


def build_models(policy: LlamaForCausalLM, lora: LoRASettings = LoRASettings(), shared_backbone: bool = False,
                 value_head: ValueHeadSettings = ValueHeadSettings()):
    """(PPOModels, trainable, frozen, dropout) from the SFT policy. Consumes `policy` (adapters merged/added in
    place)."""
    _prepare(policy, lora, lora.dropout if lora.enabled else 0.0)
    no_rng = nnx.State({})
    if lora.enabled:
        policy.eval()
        sample_def = nnx.split(policy, LoRAParam, BASE_PARAMS, nnx.RngState)[0]
        policy.train()
        policy_def, trainable_policy, frozen, policy_rng = nnx.split(policy, LoRAParam, BASE_PARAMS, nnx.RngState)
        trainable_policy = _master(trainable_policy)
        reference_def = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(
            policy.config, dtype=policy.dtype, param_dtype=jax.tree.leaves(frozen)[0].dtype)))[0]
    else:
        policy_def, trainable_policy = nnx.split(policy, nnx.Param)
        sample_def, policy_rng = policy_def, no_rng
        frozen = _copy(trainable_policy)
        reference_def = policy_def

    head = _value_head(policy.config.hidden_size, value_head)
    value_rng = no_rng
    if shared_backbone:
        value_def, value_params = nnx.split(head)
    else:
        # LlamaValueModel's structure with the policy's graph (same adapters) as trunk, without allocating a trunk.
        value_model = nnx.eval_shape(lambda: LlamaValueModel(policy.config, dtype=policy.dtype))
        if lora.enabled:
            value_model.trunk = nnx.merge(policy_def, trainable_policy, frozen, policy_rng)
            value_model.value_head = head
            value_def, value_params, value_rng, _ = nnx.split(
                value_model, nnx.Any(LoRAParam, nnx.PathContains("value_head")), nnx.RngState, ...)
        else:
            value_model.trunk = nnx.merge(policy_def, trainable_policy)
            value_model.value_head = head
            value_def, value_params = nnx.split(value_model, nnx.Param)
        value_params = _copy(value_params)  # initialised from the SFT weights, trained separately
    models = PPOModels(policy_def, sample_def, reference_def, value_def, lora.enabled, shared_backbone,
                       float(value_head.dropout))
    dropout = {"policy": policy_rng, "value": _copy(value_rng)}
    return models, {"policy": trainable_policy, "value": value_params}, frozen, dropout
