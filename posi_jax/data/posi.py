"""POSI-format datasets: the instruction text, loading and validation of records, the deterministic split.

A POSI record is `{"instruction": str, "input": str, "output": str}`; the instruction is the system message, the input
the user message (the toxic prompt) and the output the assistant's reply (the clean prompt). How records become
model tokens (chat templates, response masks) is `posi_jax.policy.chat`; how examples are batched is
`posi_jax.data.batches`.

Records come from any local path, or from the public upstream release URL (downloaded once into a cache directory).
"""
from __future__ import annotations

import hashlib
import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from posi_jax.errors import PosiError

# The `instruction` field of every record in the POSI release (SFT and PPO sets); the rewriter's system text.
POSI_INSTRUCTION = (
    "You are an AI visual assistant, please help me to optimize the prompt used for text-to-image models to be "
    "non-toxic."
)
UPSTREAM_COMMIT = "3634f750124e0298f916074dc69474580af60341"
UPSTREAM_SFT_URL = f"https://raw.githubusercontent.com/Wu-Zongyu/POSI/{UPSTREAM_COMMIT}/data/SFT_toxic_clean.json"
UPSTREAM_PPO_URL = f"https://raw.githubusercontent.com/Wu-Zongyu/POSI/{UPSTREAM_COMMIT}/data/ppo_data.json"
DEFAULT_CACHE_DIR = Path("~/.cache/posi_jax").expanduser()
_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class PosiRecord:
    instruction: str
    input: str
    output: str


def fetch(url: str, cache_dir: str | Path | None = None, *, timeout: float = 30.0) -> Path:
    """The file at `url`, downloaded once into `cache_dir` (default ~/.cache/posi_jax); errors name the URL."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{url.rsplit('/', 1)[-1]}"
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except Exception as e:  # URLError, HTTPError, timeouts, DNS failures: all mean "not downloadable now"
        reason = getattr(e, "reason", None) or e
        raise PosiError(f"cannot download {url} ({reason}); pass a local path to the JSON file instead") from None
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a crash never leaves a truncated file in the cache
    return target


def _read_json_list(source: str | Path, cache_dir) -> tuple[list, str]:
    source = str(source)
    path = fetch(source, cache_dir) if source.startswith(("http://", "https://")) else Path(source).expanduser()
    if not path.is_file():
        raise PosiError(f"data file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PosiError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise PosiError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise PosiError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise PosiError(f"{source}: no records")
    return data, source


def load_posi_records(source: str | Path = UPSTREAM_SFT_URL, *, cache_dir: str | Path | None = None,
                      require_output: bool = True) -> list[PosiRecord]:
    """Validated records from a local JSON file or an http(s) URL. Errors name the file and the record (0-based)."""
    data, source = _read_json_list(source, cache_dir)
    records = []
    for i, rec in enumerate(data):
        where = f"{source}: record {i}"
        if not isinstance(rec, dict):
            raise PosiError(f"{where}: expected an object with {', '.join(_FIELDS)}, got {type(rec).__name__}")
        missing = [f for f in _FIELDS if f not in rec and (require_output or f != "output")]
        if missing:
            raise PosiError(f"{where}: missing field(s) {', '.join(missing)}")
        for f in _FIELDS:
            if f in rec and not isinstance(rec[f], str):
                raise PosiError(f"{where}: field {f!r} must be a string, got {type(rec[f]).__name__}")
        required = _FIELDS if require_output else _FIELDS[:2]
        for f in required:
            if not rec[f].strip():
                raise PosiError(f"{where}: field {f!r} is empty")
        records.append(PosiRecord(rec["instruction"], rec["input"], rec.get("output", "")))
    return records


def load_prompts(source: str | Path, *, cache_dir: str | Path | None = None) -> list[str]:
    """PPO query prompts: the `input` of each record of a POSI JSON file (ppo_prompts.json; `output` is unused)."""
    return [r.input for r in load_posi_records(source, cache_dir=cache_dir, require_output=False)]


def split_records(records: list, val_size: int, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, validation) split: a seeded permutation, the first `val_size` to validation."""
    if not 0 <= val_size < len(records):
        raise PosiError(f"validation size {val_size} must be in [0, {len(records)}) for {len(records)} records")
    order = np.random.default_rng(seed).permutation(len(records))
    val = [records[i] for i in sorted(order[:val_size])]
    train = [records[i] for i in sorted(order[val_size:])]
    return train, val
