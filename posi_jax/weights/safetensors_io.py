"""Read safetensors files / sharded HF folders with numpy only (no torch)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from posi_jax.errors import PosiError


class SafetensorsFolder:
    """All tensors of a file or HF folder (`model.safetensors` or a sharded `*.safetensors.index.json`), lazily."""

    def __init__(self, path: str | Path, stem: str = "model"):
        from safetensors import safe_open

        path = Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            index = path / f"{stem}.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise PosiError(f"{index}: not a valid safetensors index ({e})") from None
                files = sorted({path / f for f in weight_map.values()})
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise PosiError(f"{path}: no *.safetensors files found")
        else:
            raise PosiError(f"checkpoint not found: {path}")
        self._where: dict[str, object] = {}
        for f in files:
            if not f.is_file():
                raise PosiError(f"{f}: listed in the index but missing")
            try:
                handle = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise PosiError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
            for k in handle.keys():
                self._where[k] = handle
        self.path = path

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> np.ndarray:
        try:
            array = self._where[key].get_tensor(key)
        except Exception as e:
            raise PosiError(f"{self.path}: cannot read tensor {key!r} ({str(e).splitlines()[0]})") from None
        return array.astype(np.float32) if array.dtype in (np.float16,) or array.dtype.name == "bfloat16" else array


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise PosiError(f"missing {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PosiError(f"{path}: not valid JSON ({e})") from None


def read_tensor_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one checkpoint file as numpy ({name: array}, fp16/bf16 widened to fp32): `.safetensors`, or
    a torch zip file (.bin/.pt/.pth, TorchScript archives too) read without torch."""
    from posi_jax.weights.torch_pickle import read_torch_file

    path = Path(path)
    if not path.is_file():
        raise PosiError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        st = SafetensorsFolder(path)
        return {k: st.get(k) for k in st.keys()}
    return read_torch_file(str(path))
