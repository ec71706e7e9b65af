"""Frozen dataclass configs with YAML files and `key=value` CLI overrides. Unknown keys are errors."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posi_jax.errors import PosiError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise PosiError(f"config key {where!r}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{where}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise PosiError(f"config key {where!r}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, where) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PosiError(f"config key {where!r}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise PosiError(f"config key {where!r}: expected {annotation.__name__}, got {value!r}")
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            raise PosiError(f"config key {where!r}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and converted != value:
            raise PosiError(f"config key {where!r}: expected an integer, got {value!r}")
        return converted
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise PosiError(f"config key {where!r}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PosiError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise PosiError(f"override {dotted!r}: {p!r} is not a section")
    tree[parts[-1]] = value


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from a file this package wrote (a run or adapter config); `what` names it in errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PosiError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(data, dict):
        raise PosiError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_json_config(cls: type[T], path: str | Path, what: str) -> T:
    """`cls` from a JSON file written with `to_dict` (a run's saved config); errors name the file."""
    data = read_json(path, what)
    try:
        return from_dict(cls, data)
    except PosiError as e:
        raise PosiError(f"{path}: {e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` ← YAML file ← `key=value` overrides (dotted keys for nested sections)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PosiError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise PosiError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise PosiError(f"config file {path} must hold a mapping at top level")
        data = loaded
    for item in overrides or []:
        if "=" not in item:
            raise PosiError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, data)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


DTYPES = ("float32", "bfloat16")


def parse_dtype(name: str, where: str):
    """The jnp dtype named by a config value or CLI flag (float32 | bfloat16); `where` names the setting in errors."""
    if name not in DTYPES:
        raise PosiError(f"{where}: dtype {name!r} must be one of {', '.join(DTYPES)}")
    import jax.numpy as jnp

    return jnp.dtype(name)
