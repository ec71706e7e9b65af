"""Property tests (hypothesis) of the config loader and the commands' argparse types: any value for any numeric setting
(wrong types, NaN, ±inf, negatives, huge numbers) is either refused with a PosiError / an argparse error (exit 2, one
`error:` line) or stored as a finite number of the declared type inside its declared interval. Never another
exception, never a NaN kept. (The same through real subprocesses: test_cli_robustness.py.)"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from posi_jax import build_dataset, cli, evaluate, generate, rewrite
from posi_jax.config import INT_LIMIT, Interval, admits_inf, load_config
from posi_jax.data.build_pairs import BuildOptions
from posi_jax.errors import PosiError
from posi_jax.evaluation.run import EvalOptions
from posi_jax.policy.sampler import SamplingConfig
from posi_jax.reward.posi import RewardConfig
from posi_jax.rl.config import PPORunConfig
from posi_jax.training.sft import SFTConfig

CONFIGS = [SFTConfig, PPORunConfig, SamplingConfig, RewardConfig, EvalOptions, BuildOptions]
PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def numeric_settings(cls, prefix: str = "") -> list[tuple[str, type, type, str]]:
    """(dotted key, int or float, owning dataclass, field name) for every numeric setting, nested sections included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += numeric_settings(hint, f"{prefix}{f.name}.")
            continue
        kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in (int, float):
            out.append((prefix + f.name, kinds[0], cls, f.name))
    return out


SETTINGS = [(cls, *s) for cls in CONFIGS for s in numeric_settings(cls)]


def test_every_config_has_numeric_settings_with_valid_bounds():
    assert len(SETTINGS) > 80
    for cls, key, kind, owner, name in SETTINGS:
        interval = getattr(owner, "BOUNDS", {}).get(name)
        if interval is not None:
            Interval.parse(interval)
            default = getattr(owner(), name)
            assert default is None or default in Interval.parse(interval), (owner.__name__, name, default)


def finite_or_admitted(value, interval) -> bool:
    """Finite, or inf where the setting's interval is closed at inf (a setting whose inf means "off")."""
    return admits_inf(value, interval) or math.isfinite(value)


def assert_valid(config) -> None:
    """Every numeric leaf of a loaded config: of its declared type, finite, inside its declared interval."""
    own = {name: kind for _, kind, owner, name in numeric_settings(type(config)) if owner is type(config)}
    bounds = getattr(type(config), "BOUNDS", {})
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            assert_valid(value)
        elif f.name in own and value is not None:
            kind = own[f.name]
            assert not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float)), (f, value)
            assert finite_or_admitted(value, bounds.get(f.name)) and (kind is float or abs(value) <= INT_LIMIT), \
                (f.name, value)
            assert f.name not in bounds or value in Interval.parse(bounds[f.name]), (f.name, value)


# Values as YAML would give them (a config file) and as text (a key=value override).
objects = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, -1, 1, 2, 7, 2**31 - 1, 2**31, -(2**31), 10**400, 0.5, 1.0, -0.0, 1e-300, 1e308]),
    st.booleans(), st.none(), st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
texts = st.one_of(
    st.sampled_from(["nan", ".nan", "NaN", ".NaN", "inf", ".inf", "-.inf", "+.inf", "1e999", "-1e999", "1.0e+999",
                     "1e30", "1.0e30", "0x1F", "0o17", "1_000", "[1", "{a: 1}", "[1, 2]", "~", "null", "true", "no",
                     "", " ", "3.5", "-0", "-1", "0", "2147483648", "99999999999999999999", "1:2", "&a 1", "!!int 3",
                     "!!float nan", "!!python/int 3", "'5'", "\"nan\""]),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
)


def loads_or_refuses(load) -> None:
    try:
        config = load()
    except PosiError:
        return
    assert_valid(config)


@PROPERTY
@given(data=st.data())
def test_overrides_never_store_a_bad_number(data):
    cls, key, *_ = data.draw(st.sampled_from(SETTINGS))
    text = data.draw(texts)
    loads_or_refuses(lambda: load_config(cls, None, [f"{key}={text}"]))


@PROPERTY
@given(data=st.data())
def test_config_files_never_store_a_bad_number(data):
    cls, key, *_ = data.draw(st.sampled_from(SETTINGS))
    value = data.draw(objects)
    tree: dict = {}
    node = tree
    *sections, last = key.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        loads_or_refuses(lambda: load_config(cls, path))


@PROPERTY
@given(data=st.data())
def test_dataclasses_built_directly_refuse_bad_numbers(data):
    """The same check holds for a config made in Python (the library API), not only for loaded ones."""
    _, _, _, owner, name = data.draw(st.sampled_from(SETTINGS))
    value = data.draw(objects)
    loads_or_refuses(lambda: owner(**{name: value}))


# ---- argparse ----------------------------------------------------------------------------------------------------
@PROPERTY
@given(data=st.data())
def test_argparse_types_return_only_valid_numbers(data):
    _, _, kind, owner, name = data.draw(st.sampled_from(SETTINGS))
    interval = getattr(owner, "BOUNDS", {}).get(name)
    parse, kind, interval = data.draw(st.sampled_from([
        (cli.setting(owner, name), kind, interval), (cli.positive_int, int, "[1, inf)"), (cli.seed, int, "[0, inf)"),
        (cli.finite_float, float, None), (cli.number(float, "(0, 1]"), float, "(0, 1]"),
        (cli.number(int, "[0, 256]"), int, "[0, 256]")]))
    text = data.draw(texts)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError:
        return
    assert not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float)), (text, value)
    assert finite_or_admitted(value, interval) and (kind is float or abs(value) <= INT_LIMIT), (text, value)
    assert interval is None or value in Interval.parse(interval), (text, value, interval)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    (root / "p.txt").write_text("a cat\n")
    return root


# The numeric flags of each command (with the arguments it requires). A flag added with a numeric default and left
# out of this table fails `test_the_table_lists_every_numeric_flag`.
PARSERS = {
    "rewrite": (rewrite.parse_args, [], ["--temperature", "--top-p", "--top-k", "--max-new-tokens", "--prompt-lookup-tokens",
                                         "--max-prompt-tokens", "--batch-size", "--seed"]),
    "generate": (generate.parse_args, ["a cat", "--model", "m", "--out", "{root}/g"],
                 ["--steps", "--guidance", "--seed", "--n", "--height", "--width", "--batch-size"]),
    "evaluate": (evaluate.parse_args, ["{root}/p.txt", "--out", "{root}/e", "--q16-clip", "a", "--q16-prompts", "b",
                                       "--clip", "c"],
                 ["--limit", "--temperature", "--top-p", "--top-k", "--max-new-tokens", "--rewrite-batch-size", "--steps",
                  "--guidance", "--height", "--width", "--sd-batch-size", "--api-timeout", "--api-max-retries",
                  "--api-images-per-request", "--n", "--seed", "--batch-prompts", "--grid-rows", "--grid-images"]),
    "build_dataset": (build_dataset.parse_args, ["{root}/p.txt", "--out", "{root}/o.jsonl"],
                      ["--concurrency", "--max-retries", "--timeout", "--backoff-base", "--backoff-max",
                       "--max-output-chars", "--temperature", "--max-tokens"]),
}
FLAGS = [(command, flag) for command, (_, _, flags) in PARSERS.items() for flag in flags]


@pytest.mark.parametrize("command", PARSERS)
def test_the_table_lists_every_numeric_flag(command, paths):
    parse, required, flags = PARSERS[command]
    defaults = vars(parse([a.format(root=paths) for a in required]))
    numeric = {k for k, v in defaults.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= {f[2:].replace("-", "_") for f in flags}


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.data())
def test_command_parsers_refuse_or_keep_a_finite_number(data, paths):
    command, flag = data.draw(st.sampled_from(FLAGS))
    parse, required, _ = PARSERS[command]
    text = data.draw(texts)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parse([a.format(root=paths) for a in required] + [f"{flag}={text}"])
    except SystemExit as e:
        assert e.code == 2
        lines = [line for line in stderr.getvalue().splitlines() if ": error: " in line]
        assert len(lines) == 1 and "Traceback" not in stderr.getvalue()
        return
    value = getattr(args, flag[2:].replace("-", "_"))
    assert value is None or (not isinstance(value, bool) and math.isfinite(value)), (flag, text, value)
