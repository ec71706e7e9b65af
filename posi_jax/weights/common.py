"""Checkpoint → model plumbing shared by every loader: apply a mapping table, check shapes, fill an abstract model.

A mapping table is a list of `Rule(pattern, target, transform)`: `pattern` is a regex over checkpoint keys (full
match), `target` a dotted parameter path with `{0}`, `{1}` for the regex groups, and `transform` a function applied
to the numpy array (transpose, reshape, split). One checkpoint tensor that holds several parameters (a fused qkv
projection) has a tuple of targets and a tuple of transforms, one per target. Nothing outside posi_jax/weights/
knows checkpoint key names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from posi_jax.errors import PosiError


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | tuple[str, ...] | None  # None: a key we know and deliberately drop (e.g. rotary inv_freq buffers)
    transform: Callable[[np.ndarray], np.ndarray] | tuple[Callable[[np.ndarray], np.ndarray], ...] | None = None

    def __post_init__(self):
        if isinstance(self.target, tuple) != isinstance(self.transform, tuple) or (
                isinstance(self.target, tuple) and len(self.target) != len(self.transform)):
            raise ValueError(f"Rule {self.pattern!r}: a tuple of targets needs a tuple of transforms of equal length")

    def expand(self, groups: tuple) -> list[tuple[str, "Rule"]]:
        """(parameter path, single-target rule) for each target, the regex groups filled in."""
        if self.target is None:
            return []
        if isinstance(self.target, str):
            return [(self.target.format(*groups), self)]
        return [(t.format(*groups), Rule(self.pattern, t, f)) for t, f in zip(self.target, self.transform)]


def transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def conv_to_hwio(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [out, in, kh, kw] -> JAX kernel [kh, kw, in, out]. A ValueError (not 4-D) lets
    `fill_abstract` report the tensor's stored shape against the parameter's."""
    if w.ndim != 4:
        raise ValueError("not a conv kernel")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def map_checkpoint(keys: Iterable[str], table: list[Rule], source: str) -> tuple[dict[str, tuple[str, Rule]], list[str]]:
    """{param path: (checkpoint key, rule)} and the list of unmapped keys. A path reached twice is an error."""
    compiled = [(re.compile(r.pattern), r) for r in table]
    mapped: dict[str, tuple[str, Rule]] = {}
    unmapped = []
    for key in keys:
        for rx, rule in compiled:
            m = rx.fullmatch(key)
            if m:
                for path, single in rule.expand(m.groups()):
                    if path in mapped:
                        raise PosiError(f"{source}: tensors {mapped[path][0]!r} and {key!r} both map to parameter {path!r}")
                    mapped[path] = (key, single)
                break
        else:
            unmapped.append(key)
    return mapped, unmapped


def fill_abstract(abstract_model: nnx.Module, get_tensor: Callable[[str], np.ndarray], keys: Iterable[str],
                  table: list[Rule], source: str, *, allow_missing: Callable[[str], bool] = lambda p: False,
                  allow_unmapped: Callable[[str], bool] = lambda k: False) -> nnx.Module:
    """Build a concrete model from an `nnx.eval_shape` one: every parameter from the checkpoint, shapes checked."""
    mapped, unmapped = map_checkpoint(keys, table, source)
    unmapped = [k for k in unmapped if not allow_unmapped(k)]
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        raise PosiError(f"{source}: {len(unmapped)} unexpected tensor(s) for this architecture: {shown}")
    graphdef, state = nnx.split(abstract_model)
    filled = []
    for path, var in nnx.to_flat_state(state):
        dotted = ".".join(str(p) for p in path)
        spec = var.get_value()
        if dotted not in mapped:
            if allow_missing(dotted):
                filled.append((path, var.replace(jnp.zeros(spec.shape, spec.dtype))))
                continue
            raise PosiError(f"{source}: no tensor for parameter {dotted!r} (shape {tuple(spec.shape)})")
        key, rule = mapped.pop(dotted)
        array = get_tensor(key)
        stored_shape = tuple(array.shape)
        if rule.transform is not None:
            try:
                array = rule.transform(array)
            except ValueError:  # a reshape/split that the stored shape cannot satisfy
                array = np.empty((0,))
        if tuple(array.shape) != tuple(spec.shape):
            raise PosiError(f"{source}: tensor {key!r} has shape {stored_shape} but parameter {dotted!r} expects "
                            f"{tuple(spec.shape)}" + (" (after the table's transform)" if rule.transform else ""))
        filled.append((path, var.replace(jnp.asarray(array, dtype=spec.dtype))))
    if mapped:  # mapped to a path the model does not have (e.g. a config/checkpoint mismatch)
        extra = ", ".join(f"{k} -> {p}" for p, (k, _) in list(mapped.items())[:5])
        raise PosiError(f"{source}: tensor(s) map to parameters this model config does not have: {extra}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def state_dict_arrays(get_tensor: Callable[[str], np.ndarray], keys: Iterable[str]) -> Mapping[str, np.ndarray]:
    return {k: get_tensor(k) for k in keys}
