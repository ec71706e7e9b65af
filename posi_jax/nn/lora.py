"""LoRA adapters (Hu et al. 2021) on `nn.linear.Linear` layers.

The adapter lives in the layer's `lora` slot, in its own subtree, with its own Variable type `LoRAParam`, so that
- the optimizer can train only `LoRAParam` (nnx filters), and checkpoints can hold only the adapter;
- the frozen base is `state.filter(nnx.Not(LoRAParam))`, whose paths are exactly those of the model without LoRA:
  merging it with the base model's graphdef gives the PPO reference model without a second copy of the weights.
B starts at zero, so a fresh adapter leaves the model's outputs unchanged.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.nn.dropout import HashDropout
from posi_jax.nn.linear import Linear


class LoRAParam(nnx.Param):
    pass


class LoRA(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float = 0.0,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        bound = 1.0 / math.sqrt(in_features)  # kaiming-uniform(a=√5) on A, as PEFT does
        self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, rank), param_dtype, -bound, bound))
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features), param_dtype))
        self.scale = alpha / rank
        self.dropout = HashDropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype) * self.scale


def _targets(model: nnx.Module, names: tuple[str, ...]):
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and path and path[-1] in names:
            yield path, module


def add_lora(model: nnx.Module, targets=("q_proj", "v_proj"), *, rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.1, seed: int = 0) -> nnx.Module:
    """Attach a fresh adapter to every Linear whose attribute name is in `targets` (in place; returns the model)."""
    # The masks come from nn/dropout.HashDropout, which draws 64 bits per call from this stream. The stream's keys are
    # "rbg" keys (XLA's RngBitGenerator), as in earlier versions, so their saved dropout state still restores.
    rngs = nnx.Rngs(params=seed, dropout=jax.random.key(seed + 1, impl="rbg"))
    found = list(_targets(model, tuple(targets)))
    missing = sorted(set(targets) - {path[-1] for path, _ in found})
    if missing or not found:
        names = sorted({path[-1] for path, m in nnx.iter_graph(model) if isinstance(m, Linear) and path})
        raise PosiError(f"LoRA targets: no Linear layers named {', '.join(missing) or '(none given)'} in "
                        f"{type(model).__name__}; its Linear layers are {', '.join(map(str, names))}")
    for _, layer in found:
        layer.lora = LoRA(layer.in_features, layer.out_features, rank=rank, alpha=alpha, dropout=dropout,
                          param_dtype=layer.kernel[...].dtype, rngs=rngs)
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its kernel (W + scale·A·B) and remove it (in place; returns the model)."""
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, Linear) and layer.lora is not None:
            delta = layer.lora.lora_a[...].astype(jnp.float32) @ layer.lora.lora_b[...].astype(jnp.float32)
            layer.kernel[...] = (layer.kernel[...].astype(jnp.float32) + layer.lora.scale * delta).astype(layer.kernel[...].dtype)
            layer.lora = None
    return model


# The frozen base weights of a model with adapters (excludes adapters and dropout RNG state).
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(LoRAParam))
