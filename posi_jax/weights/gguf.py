"""GGUF reader (llama.cpp format) on top of the `gguf` package: metadata, dequantized tensors, tokenizer fields."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from posi_jax.errors import PosiError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


class GGUFFile:
    def __init__(self, path: str | Path):
        import gguf

        path = Path(path)
        if not path.is_file():
            raise PosiError(f"checkpoint not found: {path}")
        try:
            self._reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises ValueError/struct errors/IndexError on corrupt files
            raise PosiError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.path = path
        self._tensors = {t.name: t for t in self._reader.tensors}

    def field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def require(self, key: str):
        value = self.field(key)
        if value is None:
            raise PosiError(f"{self.path}: metadata field {key!r} is missing")
        return value

    def keys(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, key: str) -> str:
        return self._tensors[key].tensor_type.name

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32 in numpy (row-major, HF's [out, in] order for 2-D weights)."""
        import gguf

        t = self._tensors[key]
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise PosiError(f"{self.path}: tensor {key!r} has unsupported type {qtype} (supported: {', '.join(SUPPORTED_TYPES)})")
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise PosiError(f"{self.path}: cannot dequantize tensor {key!r} ({qtype}): {e}") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest-varying dimension first
        return np.asarray(array, dtype=np.float32).reshape(shape)
