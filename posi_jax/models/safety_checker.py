"""Stable Diffusion's safety checker (diffusers' `StableDiffusionSafetyChecker`) in Flax NNX: a CLIP ViT-L/14 vision
tower with its projection (our `CLIPVisionTransformer`), 17 concept embeddings and 3 "special care" embeddings in the
projection space, and one threshold per embedding. The scoring (cosines, thresholds, the special-care adjustment) is
pure math in `posi_jax/reward/safety_checker.py`; checkpoint names are mapped in `posi_jax/weights/safety_checker.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer


@dataclass(frozen=True)
class SafetyCheckerConfig:
    vision: CLIPVisionConfig  # projection_dim set: the space of the concept embeddings
    # The image normalisation of the checker's feature extractor (the SD folder's feature_extractor/); images are
    # resized (shortest side) and centre-cropped to vision.image_size.
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    num_concepts: int = 17
    num_special_care: int = 3

    def __post_init__(self):
        if self.vision.projection_dim is None:
            raise PosiError("SafetyCheckerConfig: the vision tower needs a projection_dim")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise PosiError(f"SafetyCheckerConfig: image_mean {self.image_mean} and image_std {self.image_std} must "
                            "have 3 values each, the std positive")


class StableDiffusionSafetyChecker(nnx.Module):
    def __init__(self, cfg: SafetyCheckerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_model = CLIPVisionTransformer(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim = cfg.vision.projection_dim
        # Fixed data of the released checker, never trained here; kept at full precision (cosines against them
        # decide the flags to 1e-3).
        self.concept_embeds = nnx.Param(jnp.zeros((cfg.num_concepts, dim), jnp.float32))
        self.special_care_embeds = nnx.Param(jnp.zeros((cfg.num_special_care, dim), jnp.float32))
        self.concept_thresholds = nnx.Param(jnp.zeros((cfg.num_concepts,), jnp.float32))
        self.special_care_thresholds = nnx.Param(jnp.zeros((cfg.num_special_care,), jnp.float32))

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, S, S, 3], normalised -> projected image embeddings [N, projection_dim] (unnormalised)."""
        return self.vision_model.encode(pixel_values)
