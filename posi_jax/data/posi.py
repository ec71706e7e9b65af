"""POSI-format datasets: the instruction text, loading and validation of records, the deterministic split.

A POSI record is `{"instruction": str, "input": str, "output": str}`; the instruction is the system message, the input
the user message (the toxic prompt) and the output the assistant's reply (the clean prompt). How records become
model tokens (chat templates, response masks) is `posi_jax.policy.chat`; how examples are batched is
`posi_jax.data.batches`.

Every POSI data file (SFT pairs, PPO prompts, Q16 prompt embeddings, upstream's evaluation set) is named `posi:NAME`
and found by one resolver (`resolve_data_file`): $POSI_DATA, the checkout's ../shared/data/posi, else a user cache
filled once from the pinned upstream release with a SHA-256 check. Explicit paths are used as given.
"""
from __future__ import annotations

import hashlib
import json
import os
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
UPSTREAM_BASE_URL = f"https://raw.githubusercontent.com/Wu-Zongyu/POSI/{UPSTREAM_COMMIT}"
POSI_SCHEME = "posi:"  # `posi:NAME` names a file of the POSI release, found by `resolve_data_file`
_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class PosiFile:
    name: str  # its name in a POSI data folder ($POSI_DATA, ../shared/data/posi, the cache): `posi:NAME`
    upstream: str  # its path in the upstream release
    sha256: str  # of the upstream file at UPSTREAM_COMMIT
    what: str


POSI_FILES = {f.name: f for f in (
    PosiFile("sft_toxic_clean.json", "data/SFT_toxic_clean.json",
             "b02258b719c434993ebce9d0e9f83a7079d89421abd8c8f47143fab23b5ed8f2", "SFT toxic -> clean pairs"),
    PosiFile("ppo_prompts.json", "data/ppo_data.json",
             "d3ba3785921d7e5512089808bc22070ad183c22a78cdf1c4391e9efe9e289848", "PPO query prompts"),
    PosiFile("q16_prompts.p", "prompts.p",
             "9b6c411824c2f64e0f847aa3c9f2b15b8e3a6c75e0efd82f2f672670c97ccad5", "Q16 prompt embeddings"),
    PosiFile("test_data.json", "data/test_data.json",
             "266bcc7998e60174c8d6a92d5b79148930db6aac8336e67180809cb5cd5223f4", "evaluation prompts"),
)}

_REPO = Path(__file__).resolve().parents[2]
# A source checkout's sibling data folder (the development layout); None when installed (no pyproject.toml above).
REPO_DATA_DIR = _REPO.parent / "shared" / "data" / "posi" if (_REPO / "pyproject.toml").is_file() else None


@dataclass(frozen=True)
class PosiRecord:
    instruction: str
    input: str
    output: str


def cache_dir_default() -> Path:
    """$POSI_JAX_CACHE, else $XDG_CACHE_HOME/posi_jax, else ~/.cache/posi_jax."""
    if os.environ.get("POSI_JAX_CACHE"):
        return Path(os.environ["POSI_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "posi_jax"


def upstream_url(name: str, base_url: str | None = None) -> str:
    """Where `posi:NAME` is downloaded from: $POSI_DATA_URL (a mirror of the release) or the pinned upstream commit."""
    base = base_url or os.environ.get("POSI_DATA_URL") or UPSTREAM_BASE_URL
    return f"{base.rstrip('/')}/{_posi_file(name).upstream}"


def _posi_file(name: str) -> PosiFile:
    if name not in POSI_FILES:
        raise PosiError(f"{POSI_SCHEME}{name}: unknown POSI data file; known: "
                        f"{', '.join(POSI_SCHEME + n for n in POSI_FILES)}")
    return POSI_FILES[name]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _DownloadError(Exception):
    pass


def _download(url: str, target: Path, sha256: str | None, timeout: float) -> Path:
    """`url` saved atomically as `target` (a crash never leaves a truncated file), after the SHA-256 check."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except Exception as e:  # URLError, HTTPError, timeouts, DNS failures: all mean "not downloadable now"
        raise _DownloadError(str(getattr(e, "reason", None) or e)) from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise PosiError(f"{url}: downloaded file has SHA-256 {hashlib.sha256(data).hexdigest()}, expected {sha256} "
                        f"(not saved; check the URL or $POSI_DATA_URL)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def resolve_data_file(source: str | Path, *, cache_dir: str | Path | None = None, base_url: str | None = None,
                      timeout: float = 30.0) -> Path:
    """The local path of a data file.

    An explicit path is returned as is (it must exist). `posi:NAME` (one of POSI_FILES) is looked up, first found
    wins: $POSI_DATA/NAME, the checkout's ../shared/data/posi/NAME (each also under the upstream file name), then the
    user cache (`cache_dir`, default `cache_dir_default()`), which is filled once from the pinned upstream release
    (`upstream_url`) after a SHA-256 check. An http(s) URL is downloaded once into the cache (checked when it is one of
    the pinned upstream files). Offline and not cached: one error naming the URL and where to put the file."""
    text = str(source)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_default()
    pinned = {upstream_url(n, UPSTREAM_BASE_URL): POSI_SCHEME + n for n in POSI_FILES}
    text = pinned.get(text, text)  # a pinned upstream URL is that POSI file (local copies, cache, checksum)
    if text.startswith(("http://", "https://")):
        target = cache / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-{text.rsplit('/', 1)[-1]}"
        if target.is_file():
            return target
        try:
            return _download(text, target, None, timeout)
        except _DownloadError as e:
            raise PosiError(f"cannot download {text} ({e}); download it yourself and pass its local path") from None
    if not text.startswith(POSI_SCHEME):
        path = Path(text).expanduser()
        if not path.is_file():
            raise PosiError(f"data file not found: {path}")
        return path

    f = _posi_file(text[len(POSI_SCHEME):])
    folders = [Path(os.environ["POSI_DATA"]).expanduser()] if os.environ.get("POSI_DATA") else []
    folders += [REPO_DATA_DIR] if REPO_DATA_DIR is not None else []
    for folder in folders:
        for name in dict.fromkeys((f.name, f.upstream.rsplit("/", 1)[-1])):
            if (folder / name).is_file():
                return folder / name
    target = cache / f"posi-{UPSTREAM_COMMIT[:7]}" / f.name
    if target.is_file() and _sha256(target) == f.sha256:
        return target
    url = upstream_url(f.name, base_url)
    try:
        return _download(url, target, f.sha256, timeout)
    except _DownloadError as e:
        looked = f"not in {', '.join(str(d) for d in folders)}" if folders else "$POSI_DATA is not set"
        stale = " (the cached copy there has the wrong SHA-256)" if target.is_file() else ""
        raise PosiError(f"{text} ({f.what}) is not available: {looked}, not cached{stale}, and {url} cannot "
                        f"be downloaded ({e}); download that URL to {target} (SHA-256 {f.sha256}), or put it as "
                        f"{f.name} in a folder and set POSI_DATA to that folder") from None


def posi_or_path(source: str | Path) -> Path:
    """`posi:NAME` resolved (`resolve_data_file`); any other value as a Path (its reader reports a missing file)."""
    return resolve_data_file(source) if str(source).startswith(POSI_SCHEME) else Path(source)


def _read_json_list(source: str | Path, cache_dir) -> tuple[list, str]:
    source = str(source)
    path = resolve_data_file(source, cache_dir=cache_dir)
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


def load_posi_records(source: str | Path = "posi:sft_toxic_clean.json", *, cache_dir: str | Path | None = None,
                      require_output: bool = True) -> list[PosiRecord]:
    """Validated records from a local JSON file, `posi:NAME` or an http(s) URL (`resolve_data_file`). Errors name the
    file and the record (0-based)."""
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
