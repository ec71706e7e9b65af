"""The SD safety checker as a scorer: images -> per-image concept scores and an NSFW flag, on device.

Reference (diffusers' `StableDiffusionSafetyChecker.forward`), per image:
- cosines of the unit image embedding with the unit special-care embeddings (3) and concept embeddings (17);
- special score j = round(cos_j − threshold_j + a_j, 3), where a_j = 0.01 once an earlier special score was > 0;
- "special care" when any special score is > 0: every concept score then gets + 0.01 (a stricter filter);
- concept score k = round(cos_k − threshold_k + (0.01 if special care else 0), 3); flagged when any is > 0.
The rounding to three decimals is part of the decision (a score in (0, 0.0005] is not a flag) and is kept, in float32
as the reference computes it.

Images are preprocessed on device with `clip_preprocess` (the uint8 round trip the reference's PIL conversion has, then
the feature extractor's bicubic resize, centre crop and normalisation; measured within one grey level of transformers'
CLIPImageProcessor). `black_out` zeroes flagged images, as the reference pipeline returns them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.models.clip import normalize
from posi_jax.reward.preprocess import clip_preprocess

SPECIAL_CARE_ADJUSTMENT = 0.01


def safety_checker_scores(image_embeds: jax.Array, concept_embeds: jax.Array, concept_thresholds: jax.Array,
                          special_embeds: jax.Array, special_thresholds: jax.Array) -> dict[str, jax.Array]:
    """image_embeds [N, D] (unnormalised); concept [C, D] / [C]; special care [S, D] / [S] -> concept_scores [N, C],
    special_scores [N, S], special_care [N] bool, flagged [N] bool (float32 scores, rounded to 3 decimals)."""
    image = normalize(image_embeds)
    special_cos = image @ normalize(special_embeds).T
    concept_cos = image @ normalize(concept_embeds).T
    special_positive = jnp.round(special_cos - special_thresholds.astype(jnp.float32), 3) > 0
    # the reference walks the special concepts in order: score j carries the adjustment when one before it was > 0
    # (and the first positive one is computed without it, so "any > 0" needs no adjustment)
    earlier = (jnp.cumsum(special_positive, axis=1) - special_positive) > 0
    special_scores = jnp.round(special_cos - special_thresholds.astype(jnp.float32)
                               + SPECIAL_CARE_ADJUSTMENT * earlier, 3)
    special_care = special_positive.any(axis=1)
    concept_scores = jnp.round(concept_cos - concept_thresholds.astype(jnp.float32)
                               + SPECIAL_CARE_ADJUSTMENT * special_care[:, None], 3)
    return dict(concept_scores=concept_scores, special_scores=special_scores, special_care=special_care,
                flagged=(concept_scores > 0).any(axis=1))


def check_images(checker, images: jax.Array) -> dict[str, jax.Array]:
    """Jittable: images [N, H, W, 3] (float in [0, 1] or uint8) -> safety_checker_scores of each image."""
    cfg = checker.config
    pixels = clip_preprocess(images, cfg.vision.image_size, mean=cfg.image_mean, std=cfg.image_std)
    return safety_checker_scores(checker.image_embeds(pixels), checker.concept_embeds[...],
                                 checker.concept_thresholds[...], checker.special_care_embeds[...],
                                 checker.special_care_thresholds[...])


def black_out(images: jax.Array, flagged: jax.Array) -> jax.Array:
    """Flagged images replaced by black ones (what the reference pipeline returns for them)."""
    return jnp.where(jnp.asarray(flagged)[:, None, None, None], jnp.zeros((), images.dtype), images)


# One compilation per image batch shape, shared by every caller (generate, the evaluation's scorer).
check_images_jit = nnx.jit(check_images)


def check_images_numpy(checker, images) -> dict[str, np.ndarray]:
    """check_images_jit's results as numpy."""
    return {k: np.asarray(v) for k, v in check_images_jit(checker, jnp.asarray(images)).items()}
