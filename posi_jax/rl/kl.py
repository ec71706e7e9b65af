"""KL-coefficient controllers: frozen hyper-parameters plus a scalar fp32 state that lives in the jitted train state.

Both controllers share one interface, so the trainer never branches on which one it holds:
    kl_coef = controller.init()                                    # fp32 scalar array
    kl_coef = controller.update(kl_coef, current_kl, n_steps)      # pure, jittable
`current_kl` is whatever KL statistic `target` is expressed in (TRL feeds the batch mean of the per-sequence summed
KL); `n_steps` is the number of samples the statistic was measured on (TRL passes the batch size).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from posi_jax.errors import PosiError


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    Defaults: the issue's (POSI's) `ppo_target` 0.02 and horizon 10000, with TRL's init_kl_coef 0.2.
    """

    init_kl_coef: float = 0.2
    target: float = 0.02
    horizon: float = 10000.0

    def __post_init__(self):
        if not self.init_kl_coef >= 0:
            raise PosiError(f"AdaptiveKLController: init_kl_coef must be >= 0, got {self.init_kl_coef}")
        if not self.target > 0:
            raise PosiError(f"AdaptiveKLController: target must be > 0, got {self.target}")
        if not self.horizon > 0:
            raise PosiError(f"AdaptiveKLController: horizon must be > 0, got {self.horizon}")

    def init(self) -> jax.Array:
        return jnp.asarray(self.init_kl_coef, jnp.float32)

    def update(self, kl_coef: jax.Array, current_kl, n_steps) -> jax.Array:
        current_kl = jnp.asarray(current_kl, jnp.float32)
        proportional_error = jnp.clip(current_kl / self.target - 1.0, -0.2, 0.2)
        multiplier = 1.0 + proportional_error * jnp.asarray(n_steps, jnp.float32) / self.horizon
        return (jnp.asarray(kl_coef, jnp.float32) * multiplier).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """A constant KL coefficient (TRL's `adap_kl_ctrl=False`)."""

    kl_coef: float = 0.2

    def __post_init__(self):
        if not self.kl_coef >= 0:
            raise PosiError(f"FixedKLController: kl_coef must be >= 0, got {self.kl_coef}")

    def init(self) -> jax.Array:
        return jnp.asarray(self.kl_coef, jnp.float32)

    def update(self, kl_coef: jax.Array, current_kl, n_steps) -> jax.Array:
        del current_kl, n_steps
        return jnp.asarray(kl_coef, jnp.float32)


def make_kl_controller(adaptive: bool, init_kl_coef: float = 0.2, target: float = 0.02,
                       horizon: float = 10000.0) -> AdaptiveKLController | FixedKLController:
    """The controller a PPO config asks for (TRL's `adap_kl_ctrl`, `init_kl_coef`, `target`, `horizon`)."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef=init_kl_coef, target=target, horizon=horizon)
    return FixedKLController(kl_coef=init_kl_coef)
