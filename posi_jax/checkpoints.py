"""The one dispatcher from any policy checkpoint to (model, tokenizer): the embedded default (SmolLM2-135M-Instruct
GGUF + the shipped POSI SFT adapter), a GGUF file, an HF safetensors folder, a LoRA adapter folder, or an SFT or PPO
run folder (orbax checkpoints). `export_policy` writes any of them as a plain HF safetensors folder."""
from __future__ import annotations

from pathlib import Path

from posi_jax.errors import PosiError


def load_policy(checkpoint: str | Path | None = None, *, dtype=None, param_dtype=None):
    """(model, tokenizer) for any policy checkpoint.

    None: the embedded SmolLM2-135M-Instruct GGUF with the shipped POSI adapter (posi_jax/assets/smollm2_posi_lora).
    A folder with adapter_config.json: its base + that LoRA adapter. A folder with sft_config.json: an SFT run (its
    latest orbax checkpoint). A folder with ppo_config.json: a PPO run (its SFT policy + the latest checkpoint's PPO
    adapter or weights). Otherwise a .gguf file or an HF safetensors folder, as is.
    """
    from posi_jax.policy.adapters import is_adapter_dir
    from posi_jax.policy.load import load_adapter_policy, load_base_policy
    from posi_jax.rl.config import PPO_RUN_CONFIG
    from posi_jax.training.sft import SFT_RUN_CONFIG, load_run_model

    if checkpoint is None:
        return load_adapter_policy(None, dtype=dtype, param_dtype=param_dtype)
    path = Path(checkpoint).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        return load_adapter_policy(path, dtype=dtype, param_dtype=param_dtype)
    if path.is_dir() and (path / SFT_RUN_CONFIG).is_file():
        import jax.numpy as jnp

        return load_run_model(path, dtype=dtype or jnp.float32)
    if path.is_dir() and (path / PPO_RUN_CONFIG).is_file():
        return load_ppo_run_policy(path, dtype=dtype, param_dtype=param_dtype)
    return load_base_policy(path, dtype=dtype, param_dtype=param_dtype)


def load_ppo_run_policy(run_dir, step: int | None = None, *, dtype=None, param_dtype=None):
    """(policy, tokenizer) of a PPO run folder: the run's SFT policy (`policy.checkpoint`, an SFT adapter merged) with
    the policy parameters of checkpoint `step` (None: the latest): its PPO adapter, or all weights when lora is off.
    The model is in eval mode; the adapter is kept (fold it with nn.lora.merge_lora). dtypes default to the run's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from posi_jax.config import parse_dtype
    from posi_jax.policy.chat import use_template
    from posi_jax.rl.config import read_run_config
    from posi_jax.rl.models import build_models, split_policy
    from posi_jax.training import checkpointing

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if step is None:
        step = checkpointing.latest_step(run_dir)
        if step is None:
            raise PosiError(f"{run_dir}: PPO run has no checkpoint under {run_dir / 'checkpoints'} (a run saves one "
                            f"every save_every={cfg.save_every} iterations and at its end)")
    policy, tokenizer = load_policy(cfg.policy.checkpoint,
                                    dtype=dtype or parse_dtype(cfg.policy.dtype, "policy.dtype"),
                                    param_dtype=param_dtype or parse_dtype(cfg.policy.param_dtype, "policy.param_dtype"))
    use_template(tokenizer, cfg.template, f"{run_dir}: template")
    # The checkpoint's trainable tree {"policy", "value"} as shapes only (nothing allocated for the value model).
    graphdef, weights = nnx.split(policy)
    abstract = jax.eval_shape(
        lambda w: build_models(nnx.merge(graphdef, w), cfg.lora, cfg.shared_value_backbone)[1], weights)
    items, _ = checkpointing.restore(run_dir, step, {"params": abstract})
    policy_def, _, base = split_policy(policy, cfg.lora)
    trained = jax.tree.map(jnp.asarray, items["params"]["policy"])
    model = nnx.merge(policy_def, trained, base) if cfg.lora.enabled else nnx.merge(policy_def, trained)
    model.eval()
    return model, tokenizer


def export_policy(checkpoint, out) -> Path:
    """Any `load_policy` checkpoint as a plain HF safetensors folder (adapters folded in) that transformers reads."""
    from posi_jax.nn.lora import merge_lora
    from posi_jax.weights.llama import save_llama_safetensors

    model, tokenizer = load_policy(checkpoint)
    return save_llama_safetensors(merge_lora(model), out, tokenizer)
