"""Frozen dataclass configs with YAML files and `key=value` CLI overrides. Unknown keys are errors, and so are values
of the wrong type, NaN and ±inf.

The numeric settings are checked where they are declared: each config dataclass's `__post_init__` calls
`check_numbers`, which holds every int and float field to its declared type, to finite values and to the interval the
class names in its `BOUNDS` table ("[1, inf)", "(0, 1]"). The commands' argparse types (`posi_jax.cli`) use the same
`Interval` and `number_problem`, so a flag and a config key are held to the same rule.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posi_jax.errors import PosiError

T = TypeVar("T")
# An int setting becomes an int32 shape, index or seed on the device: larger magnitudes are refused up front.
INT_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Interval:
    """A set of numbers in math notation: "[1, inf)", "(0, 1]", "[-1, 1]"; `inf` may be written on either side."""

    text: str
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    @staticmethod
    @functools.cache
    def parse(text: str) -> "Interval":
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
        if m is None:
            raise ValueError(f"not an interval: {text!r}")
        lo, hi = float(m.group(2)), float(m.group(3))
        return Interval(text.strip(), lo, hi, m.group(1) == "[", m.group(4) == "]")

    def __contains__(self, x) -> bool:
        above = x >= self.lo if self.lo_closed else x > self.lo
        below = x <= self.hi if self.hi_closed else x < self.hi
        return bool(above and below)

    def describe(self) -> str:
        lo, hi = self.text[1:-1].split(",")
        if math.isinf(self.hi):
            return f"{'≥' if self.lo_closed else '>'} {lo.strip()}"
        if math.isinf(self.lo):
            return f"{'≤' if self.hi_closed else '<'} {hi.strip()}"
        return f"in {self.text}"


def number_problem(value: Any, kind: type, interval: str | None = None) -> str | None:
    """What is wrong with `value` as a setting of type `kind` (int or float) within `interval`, or None if nothing:
    an int setting takes an int (not a bool) of magnitude ≤ INT_LIMIT, a float setting a finite int or float (or inf,
    where the interval is closed at inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "must be an integer" if kind is int else "must be a number"
    if kind is int and not isinstance(value, numbers.Integral):
        return "must be an integer"
    if kind is int and abs(value) > INT_LIMIT:
        return f"must be at most {INT_LIMIT} in magnitude"
    if kind is float and not _finite_float(value) and not admits_inf(value, interval):
        return "must be a finite number"
    if interval is not None and value not in Interval.parse(interval):
        return f"must be {Interval.parse(interval).describe()}"
    return None


def admits_inf(value, interval: str | None) -> bool:
    """Whether `value` is a float ±inf that `interval` contains: an interval closed at inf ("(0, inf]") admits it,
    for a setting whose inf means "off"."""
    return (isinstance(value, float) and math.isinf(value) and interval is not None
            and value in Interval.parse(interval))


def _finite_float(value: numbers.Real) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond the float range
        return False


@functools.cache
def _numeric_fields(cls) -> dict[str, tuple[type, bool]]:
    """{field name: (int or float, None allowed)} of a dataclass's numeric fields (`int | None` is an optional int)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
        kinds = [a for a in args if a is not type(None)]
        if name in names and len(kinds) == 1 and kinds[0] in (int, float):
            out[name] = (kinds[0], type(None) in args)
    return out


def numeric_kind(cls, name: str) -> type:
    """int or float: the declared type of the numeric setting `name` of the config dataclass `cls`."""
    return _numeric_fields(cls)[name][0]


def check_numbers(config, where: str) -> None:
    """Raise PosiError unless every numeric field of the dataclass `config` is of its declared type, finite, and in
    the interval its class gives it in `BOUNDS` (a ClassVar {field: interval}); `where` prefixes the field's name."""
    bounds = getattr(type(config), "BOUNDS", {})
    for name, (kind, optional) in _numeric_fields(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        problem = number_problem(value, kind, bounds.get(name))
        if problem is not None:
            raise PosiError(f"{where}{name} {problem}, got {value!r}")


def _coerce(value: Any, annotation: Any, where: str, interval: str | None = None) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key. `interval`: the field's
    declared bounds (inf passes only where they are closed at inf)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where, interval)
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
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), float(10**400)
            raise PosiError(f"config key {where!r}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and converted != value:
            raise PosiError(f"config key {where!r}: expected an integer, got {value!r}")
        if annotation is float and not math.isfinite(converted) and not admits_inf(converted, interval):
            raise PosiError(f"config key {where!r}: expected a finite number, got {value!r}")
        return converted
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise PosiError(f"config key {where!r}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise PosiError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    bounds = getattr(cls, "BOUNDS", {})
    return cls(**{k: _coerce(v, hints[k], prefix + k, bounds.get(k)) for k, v in data.items()})


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
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise PosiError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        _set_dotted(data, key.strip(), value)
    return from_dict(cls, data)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def changed_keys(saved: dict, config, may_change=()) -> list[str]:
    """The dotted keys whose values in `config` differ from a run's `saved` config (its `to_dict`, read back from
    JSON), except keys in `may_change` or under a section named there. A key the saved config lacks (a setting added
    since) counts as holding its default."""
    def flat(tree: dict, prefix: str = "") -> dict[str, str]:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = json.dumps(v, default=str)
        return out

    before = {**flat(to_dict(type(config)())), **flat(saved)}
    now = flat(to_dict(config))
    free = set(may_change)
    return sorted(k for k in set(before) | set(now)
                  if before.get(k) != now.get(k) and not any(k == m or k.startswith(m + ".") for m in free))


DTYPES = ("float32", "bfloat16")


def parse_dtype(name: str, where: str):
    """The jnp dtype named by a config value or CLI flag (float32 | bfloat16); `where` names the setting in errors."""
    if name not in DTYPES:
        raise PosiError(f"{where}: dtype {name!r} must be one of {', '.join(DTYPES)}")
    import jax.numpy as jnp

    return jnp.dtype(name)
