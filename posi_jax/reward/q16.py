"""Q16 (Schramowski et al. 2022): p(inappropriate | image) from CLIP ViT-L/14 image embeddings and two learned
prompt embeddings (index 0 = appropriate, 1 = inappropriate): softmax(100 · cos(image, prompts))[1].

The upstream prompts file (POSI's `prompts.p`, shipped as `q16_prompts.p`) is a plain pickle of a numpy float16
array of shape (2, 768), made with `pickle.dump(np_array)`: it needs numpy only, not torch. It is read with an
unpickler that allows just numpy's array-rebuild globals, so a tampered file cannot run code. A `torch.save`d tensor
(a zip archive) is accepted too and read without torch (posi_jax/weights/torch_pickle.py).
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from posi_jax.data.posi import posi_or_path
from posi_jax.errors import PosiError
from posi_jax.models.clip import normalize

Q16_LOGIT_SCALE = 100.0  # CLIP's trained temperature, as the Q16 classifier applies it
Q16_SHAPE = (2, 768)  # two prompts in CLIP ViT-L/14's 768-d embedding space

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a Q16 prompts file")
        module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 moved numpy.core (same objects)
        return getattr(__import__(module, fromlist=[name]), name)


def load_q16_prompts(path: str | Path) -> np.ndarray:
    """The two Q16 prompt embeddings as float32 [2, 768] (stored as float16 upstream); `posi:q16_prompts.p` is the
    release's file, found by the POSI data resolver."""
    path = posi_or_path(path)
    if not path.is_file():
        raise PosiError(f"Q16 prompts file not found: {path}")
    raw = path.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(raw)):
        from posi_jax.weights.torch_pickle import load_torch_pickle

        obj = load_torch_pickle(str(path))
    else:
        try:
            obj = _NumpyUnpickler(io.BytesIO(raw)).load()
        except Exception as e:  # truncated / not a pickle / refused global
            raise PosiError(f"{path}: not a readable Q16 prompts pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, np.ndarray):
        raise PosiError(f"{path}: Q16 prompts file holds a {type(obj).__name__}, expected an array of shape {Q16_SHAPE}")
    if obj.shape != Q16_SHAPE or not np.issubdtype(obj.dtype, np.floating):
        raise PosiError(f"{path}: Q16 prompts have shape {obj.shape} dtype {obj.dtype}, expected float {Q16_SHAPE}")
    prompts = obj.astype(np.float32)
    if not np.isfinite(prompts).all() or (np.linalg.norm(prompts, axis=-1) == 0).any():
        raise PosiError(f"{path}: Q16 prompts contain non-finite values or a zero vector")
    return prompts


def check_q16_prompts(q16_prompts, dim: int | None = None) -> None:
    shape = tuple(np.shape(q16_prompts))
    if len(shape) != 2 or shape[0] != 2 or (dim is not None and shape[1] != dim):
        want = f"(2, {dim})" if dim is not None else "(2, D)"
        raise PosiError(f"Q16 prompts: expected shape {want}, got {shape}")


def q16_inappropriate_prob(image_embeds: jax.Array, q16_prompts: jax.Array) -> jax.Array:
    """image_embeds [N, D] (unnormalised CLIP ViT-L/14 image embeddings), q16_prompts [2, D] -> p(inappropriate) [N].
    Cosines, softmax and everything else in fp32."""
    if np.ndim(image_embeds) != 2:
        raise PosiError(f"Q16: image embeddings must be [N, D], got shape {tuple(np.shape(image_embeds))}")
    check_q16_prompts(q16_prompts, np.shape(image_embeds)[1])
    cos = normalize(image_embeds) @ normalize(jnp.asarray(q16_prompts)).T  # [N, 2]
    return jax.nn.softmax(Q16_LOGIT_SCALE * cos, axis=-1)[:, 1]
