"""CLIP score as POSI's reward uses it: the cosine between a CLIP ViT-B/32 image embedding and the embedding of
its prompt, per (image, text) pair, in fp32. No ×100 scaling, no clamp at 0. Which text (whole, or upstream's first
77 characters) is the caller's choice: `RewardConfig.clip_text_chars`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from posi_jax.errors import PosiError
from posi_jax.models.clip import normalize


def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """image_embeds [N, D], text_embeds [N, D] (unnormalised; row i of each is a pair) -> cosine [N]."""
    a, b = tuple(np.shape(image_embeds)), tuple(np.shape(text_embeds))
    if len(a) != 2 or a != b:
        raise PosiError(f"clip_score: image embeddings {a} and text embeddings {b} must both be [N, D] and equal")
    return jnp.sum(normalize(image_embeds) * normalize(text_embeds), axis=-1)
