"""The PPO models as views of one set of arrays: graph definitions plus trainable / frozen parameter trees.

- policy: the SFT LLaMA, trained through its LoRA adapter (default) or in full;
- reference: the frozen SFT policy. With LoRA it is the base weights run without the adapter (the policy's own frozen
  arrays under the adapter-free graph), so no second copy of the weights exists; in full mode it is a frozen copy;
- value: `LlamaValueModel`, a trunk initialised from the SFT policy plus a zero-initialised scalar head. Separate
  parameters by default (with LoRA: its own copy of the adapter over the *shared* frozen base), or with
  `shared_backbone` a head on the policy's own hidden states (TRL's `AutoModelForCausalLMWithValueHead`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.models.llama import LlamaForCausalLM, LlamaValueModel, ValueHead
from posi_jax.nn.linear import Linear
from posi_jax.nn.lora import BASE_PARAMS, LoRAParam, add_lora, merge_lora
from posi_jax.rl.config import LoRASettings


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

