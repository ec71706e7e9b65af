"""posi_jax: POSI, the universal prompt optimizer for safe text-to-image generation, in pure JAX / Flax NNX.

Public API (imported lazily so `import posi_jax` stays cheap):
    Rewriter            toxic → clean prompt rewriting with a LLaMA-family policy
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Rewriter": ("posi_jax.rewriter", "Rewriter"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'posi_jax' has no attribute {name!r}")


__all__ = list(_LAZY)
