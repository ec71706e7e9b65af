"""POSI-format datasets: loading and validation, chat templating with a response-only loss mask, batching, split.

A POSI record is `{"instruction": str, "input": str, "output": str}`; the instruction is the system message, the input
the user message (the toxic prompt) and the output the assistant's reply (the clean prompt). `chat_prompt_ids` is the
one place that turns an instruction + prompt into the model's chat-formatted request: the rewriter and the SFT
examples both call it, so training and inference see the same tokens.

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


# ---- loading ---------------------------------------------------------------------------------------------------------
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


# ---- tokenization ----------------------------------------------------------------------------------------------------
def chat_messages(instruction: str, prompt: str, response: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def chat_prompt_ids(tokenizer, instruction: str, prompt: str) -> list[int]:
    """Token ids of the chat-formatted request (system = instruction, user = prompt, then the assistant header)."""
    return tokenizer.encode(tokenizer.apply_chat_template(chat_messages(instruction, prompt), add_generation_prompt=True))


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # [T] int32: prompt tokens then response tokens
    loss_mask: np.ndarray  # [T] bool: True on response tokens (the tokens the model is trained to produce)


def encode_example(tokenizer, record: PosiRecord, cutoff_len: int) -> Example | None:
    """Prompt + response tokens with a response-only loss mask, truncated to `cutoff_len` tokens.

    The response is what the chat template renders after the generation prompt, up to and including the end-of-turn
    (EOS) token; the template's trailing newline after EOS is not trained. Truncation cuts the end of the sequence;
    an example with no response token left (the prompt alone fills the cutoff) gives None.
    """
    prompt_text = tokenizer.apply_chat_template(chat_messages(record.instruction, record.input), True)
    full_text = tokenizer.apply_chat_template(chat_messages(record.instruction, record.input, record.output), False)
    if not full_text.startswith(prompt_text):
        raise PosiError("the chat template renders the conversation differently from its generation prompt; "
                        "cannot separate response tokens")
    prompt = tokenizer.encode(prompt_text)
    response = tokenizer.encode(full_text[len(prompt_text):])
    ends = [i for i, t in enumerate(response) if t in tokenizer.eos_ids]
    if ends:
        response = response[: ends[0] + 1]
    ids = (prompt + response)[:cutoff_len]
    if len(ids) <= len(prompt):
        return None
    mask = np.zeros(len(ids), bool)
    mask[len(prompt):] = True
    return Example(np.asarray(ids, np.int32), mask)


def encode_examples(tokenizer, records: list[PosiRecord], cutoff_len: int) -> tuple[list[Example], int]:
    """(examples, number dropped because the prompt alone reached the cutoff)."""
    out = [encode_example(tokenizer, r, cutoff_len) for r in records]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


# ---- batching --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    ids: np.ndarray  # [B, T] int32, right-padded with pad_id
    attention_mask: np.ndarray  # [B, T] bool
    loss_mask: np.ndarray  # [B, T] bool: True where ids[t] is a response token to predict from ids[:t]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pad_batch(examples: list[Example], pad_id: int, pad_multiple: int = 1, batch_size: int | None = None) -> Batch:
    """Right-pad to the longest example rounded up to `pad_multiple` (few distinct shapes → few compilations).

    With `batch_size`, missing rows are all padding (no tokens, no loss), so the last batch keeps the same shape.
    """
    rows = batch_size or len(examples)
    length = max(len(e.ids) for e in examples)
    length = -(-length // pad_multiple) * pad_multiple
    ids = np.full((rows, length), pad_id, np.int32)
    attn = np.zeros((rows, length), bool)
    loss = np.zeros((rows, length), bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n], attn[i, :n], loss[i, :n] = e.ids, True, e.loss_mask
    return Batch(ids, attn, loss)


def bucketed_batches(examples: list[Example], batch_size: int, *, pad_id: int, seed: int, epoch: int,
                     pad_multiple: int = 32, bucket_batches: int = 16, shuffle: bool = True) -> list[Batch]:
    """One epoch of length-bucketed padded batches, a pure function of (seed, epoch).

    Examples are shuffled, cut into windows of `bucket_batches` batches, sorted by length inside each window (similar
    lengths share a batch: little padding), and the batches are shuffled again. Without `shuffle` (validation) the
    order is simply by length.
    """
    if not examples:
        raise PosiError("no examples to batch")
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(examples))
        window = batch_size * bucket_batches
        order = np.concatenate([sorted(order[i:i + window], key=lambda j: len(examples[j].ids))
                                for i in range(0, len(order), window)])
    else:
        rng = None
        order = np.asarray(sorted(range(len(examples)), key=lambda j: len(examples[j].ids)))
    batches = [pad_batch([examples[j] for j in order[i:i + batch_size]], pad_id, pad_multiple, batch_size)
               for i in range(0, len(order), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
