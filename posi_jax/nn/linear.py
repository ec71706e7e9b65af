"""Dense layer with separate parameter / compute dtypes and an optional LoRA adapter slot (see nn/lora.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (checkpoint tables transpose torch's [out, in])."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None, init_std: float = 0.02):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora = nnx.data(None)  # set by nn.lora.add_lora; kept in its own subtree so it can be trained/saved alone
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(self.dtype)
        return y
