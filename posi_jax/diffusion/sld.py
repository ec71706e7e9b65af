"""Safe Latent Diffusion guidance (Schramowski et al., "Safe Latent Diffusion", CVPR 2023): the math of one step.

Each denoising step the UNet predicts the noise under three texts in one batched call: the unconditional (negative)
text ε_u, the prompt ε_p and the safety concept ε_S. Classifier-free guidance moves along ε_p − ε_u; SLD removes a
safety term along ε_S − ε_u, element by element, wherever the prompt's prediction is not already farther than the
threshold λ from the concept's:

    μ       = min(s_S · |ε_p − ε_S|, 1)   where ε_p − ε_S < λ, else 0          (eq. 5, 6)
    γ       = μ · (ε_S − ε_u) + s_m · ν                                        (eq. 4, 7)
    ν'      = β_m · ν + (1 − β_m) · γ                                          (eq. 8)
    ε       = ε_u + s_g · (ε_p − ε_u − [i ≥ δ] · γ)                            (eq. 3)

The momentum ν starts at zero and builds up from the first step, also during the δ warm-up steps in which the safety
term is not applied (the reference implementation's behaviour). The step index i counts model evaluations (PNDM's
extra first evaluation included), as the reference loop does.

`sld_guidance` is pure array code over one step; the pipeline (`diffusion/pipeline.py`) carries ν in its `lax.scan`.
The hyper-parameters enter a jitted function as arrays (`SLDConfig.params()`), so every preset shares one compilation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from posi_jax.errors import PosiError

# The safety concept of the paper and its reference implementation: the I2P categories written out.
SAFETY_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
                  " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons,"
                  " child abuse, brutality, cruelty")


@dataclass(frozen=True)
class SLDConfig:
    """SLD hyper-parameters (the paper's δ, s_S, λ, s_m, β_m) and the safety concept text."""
    warmup_steps: int = 10  # δ: steps before the safety term is applied
    guidance_scale: float = 1000.0  # s_S: scale of the element-wise safety strength μ (clipped to 1)
    threshold: float = 0.01  # λ: elements with ε_p − ε_S ≥ λ are left alone
    momentum_scale: float = 0.3  # s_m
    momentum_beta: float = 0.4  # β_m: share of the previous momentum kept
    concept: str = SAFETY_CONCEPT

    def __post_init__(self):
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise PosiError(f"SLD warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("guidance_scale", "threshold", "momentum_scale", "momentum_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PosiError(f"SLD {name} must be a finite number, got {value!r}")
        # The reference switches SLD off for a scale <= 1; here "no SLD" is `sld=None`, so a scale that would do
        # nothing is a mistake to report, not a silent no-op.
        if self.guidance_scale <= 1.0:
            raise PosiError(f"SLD guidance_scale must be > 1, got {self.guidance_scale!r} (for no SLD, pass none)")
        if not 0.0 <= self.momentum_beta <= 1.0:
            raise PosiError(f"SLD momentum_beta must be in [0, 1], got {self.momentum_beta!r}")
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise PosiError("SLD concept must be a non-empty string")

    def params(self) -> SLDParams:
        return _params(self)


class SLDParams(NamedTuple):
    """SLDConfig's numbers as arrays (a pytree): traced inside a jit, so changing them does not recompile."""
    warmup_steps: jax.Array  # int32 scalar
    guidance_scale: jax.Array  # float32 scalars below
    threshold: jax.Array
    momentum_scale: jax.Array
    momentum_beta: jax.Array


def _params(cfg: "SLDConfig") -> SLDParams:
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return SLDParams(jnp.asarray(cfg.warmup_steps, jnp.int32), f32(cfg.guidance_scale), f32(cfg.threshold),
                     f32(cfg.momentum_scale), f32(cfg.momentum_beta))


# The four configurations of the paper's experiments, as the reference implementation names them (its SafetyConfig).
SLD_PRESETS: dict[str, SLDConfig] = {
    "weak": SLDConfig(warmup_steps=15, guidance_scale=20.0, threshold=0.0, momentum_scale=0.0, momentum_beta=0.0),
    "medium": SLDConfig(warmup_steps=10, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4),
    "strong": SLDConfig(warmup_steps=7, guidance_scale=2000.0, threshold=0.025, momentum_scale=0.5, momentum_beta=0.7),
    "max": SLDConfig(warmup_steps=0, guidance_scale=5000.0, threshold=1.0, momentum_scale=0.5, momentum_beta=0.7),
}


def sld_config(sld: SLDConfig | str | None) -> SLDConfig | None:
    """A preset name (weak / medium / strong / max), an SLDConfig, or None (no SLD) -> SLDConfig or None."""
    if sld is None or isinstance(sld, SLDConfig):
        return sld
    if isinstance(sld, str) and sld.lower() in SLD_PRESETS:
        return SLD_PRESETS[sld.lower()]
    raise PosiError(f"SLD preset {sld!r}: choose one of {', '.join(SLD_PRESETS)}")


def sld_guidance(eps_uncond: jax.Array, eps_text: jax.Array, eps_safety: jax.Array, momentum: jax.Array,
                 step: jax.Array | int, cfg: SLDConfig | SLDParams) -> tuple[jax.Array, jax.Array]:
    """One step of SLD: (guidance direction, next momentum), all float32 of the noise's shape.

    The caller forms ε = ε_u + s_g · direction. `step` (the model-evaluation index) and `cfg`'s numbers may be traced.
    """
    eps_uncond, eps_text, eps_safety, momentum = (a.astype(jnp.float32)
                                                  for a in (eps_uncond, eps_text, eps_safety, momentum))
    text_minus_safety = eps_text - eps_safety
    strength = jnp.minimum(jnp.abs(text_minus_safety) * cfg.guidance_scale, 1.0)
    strength = jnp.where(text_minus_safety >= cfg.threshold, 0.0, strength)
    safety = (eps_safety - eps_uncond) * strength + cfg.momentum_scale * momentum
    next_momentum = cfg.momentum_beta * momentum + (1.0 - cfg.momentum_beta) * safety
    direction = eps_text - eps_uncond
    direction = jnp.where(step >= cfg.warmup_steps, direction - safety, direction)
    return direction, next_momentum
