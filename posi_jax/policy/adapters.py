"""LoRA adapter folders: `adapter.safetensors` (only the LoRA A/B matrices, keyed by parameter path) and
`adapter_config.json` (targets, rank, alpha, dropout, the base checkpoint, provenance).

The base is named in the config: `null` means the embedded SmolLM2-135M-Instruct GGUF, else a path (a .gguf file or an
HF folder). `posi_jax.policy.load.load_adapter_policy` loads base + adapter from such a folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from posi_jax.config import read_json
from posi_jax.errors import PosiError
from posi_jax.nn.lora import LoRAParam, add_lora

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


def is_adapter_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file()


def adapter_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """{dotted parameter path: array} of every LoRA parameter of `model`."""
    state = nnx.state(model, LoRAParam)
    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def save_adapter(model: nnx.Module, folder, *, targets, rank: int, alpha: float, dropout: float,
                 base: str | None, extra: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = adapter_arrays(model)
    if not arrays:
        raise PosiError("the model has no LoRA adapter to save")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, str(folder / ADAPTER_FILE))
    meta = {"format": "posi_jax-lora-v1", "targets": list(targets), "rank": int(rank), "alpha": float(alpha),
            "dropout": float(dropout), "base": base, **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_adapter_config(folder) -> dict:
    path = Path(folder) / CONFIG_FILE
    meta = read_json(path, "adapter config")
    for key, kind in (("targets", list), ("rank", int), ("alpha", (int, float))):
        if not isinstance(meta.get(key), kind):
            raise PosiError(f"{path}: field {key!r} missing or of the wrong type")
    return meta


def load_adapter(model: nnx.Module, folder) -> nnx.Module:
    """Attach the adapter stored in `folder` to `model` (in place; returns the model). Shapes are checked."""
    from posi_jax.weights.safetensors_io import SafetensorsFolder

    folder = Path(folder)
    meta = read_adapter_config(folder)
    add_lora(model, tuple(meta["targets"]), rank=meta["rank"], alpha=meta["alpha"], dropout=meta.get("dropout", 0.0))
    st = SafetensorsFolder(folder / ADAPTER_FILE)
    stored = set(st.keys())
    state = nnx.state(model, LoRAParam)
    filled = []
    for path, var in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if key not in stored:
            raise PosiError(f"{folder / ADAPTER_FILE}: no tensor for adapter parameter {key!r}")
        array = st.get(key)
        want = tuple(var.get_value().shape)
        if tuple(array.shape) != want:
            raise PosiError(f"{folder / ADAPTER_FILE}: tensor {key!r} has shape {tuple(array.shape)} but the model "
                            f"expects {want}")
        stored.discard(key)
        filled.append((path, var.replace(np.asarray(array, var.get_value().dtype))))
    if stored:
        raise PosiError(f"{folder / ADAPTER_FILE}: tensor(s) for parameters the model does not have: "
                        f"{', '.join(sorted(stored)[:5])}")
    nnx.update(model, nnx.from_flat_state(filled))
    return model
