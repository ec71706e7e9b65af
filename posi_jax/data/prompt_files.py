"""The one parser of prompt files: .txt (one prompt per line), .json (a list of strings or objects), .jsonl (one string
or object per line) and .csv (a `prompt` column, optional `categories`, as I2P's CSV).

It returns every line / record / row with where it came from; the callers (the pair builder, the evaluation's prompt
set and rewrites) apply their own policies to them (dropping or refusing empties and duplicates).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from posi_jax.errors import PosiError

INPUT_FORMATS = (".txt", ".json", ".jsonl", ".csv")


def decode_utf8(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PosiError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def prompt_from_item(item, where: str) -> str:
    """The prompt of one record: a string, or an object's 'input' (POSI record) or 'prompt'."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("input", "prompt"):
            if isinstance(item.get(key), str):
                return item[key]
    raise PosiError(f"{where}: expected a string or an object with an 'input' (POSI record) or 'prompt' string, "
                    f"got {type(item).__name__}: {str(item)[:80]}")


def read_prompt_records(path: str | os.PathLike, what: str, formats: tuple[str, ...] = INPUT_FORMATS
                        ) -> tuple[str, list[tuple[str, object]]]:
    """Every line / record / row of a prompt file as (where, item) pairs, and the file's suffix. The one parser of
    prompt files (`data.build_pairs.read_prompts` and `evaluation.prompts.read_prompt_set` apply their own policies to its records).

    .txt: one item per line (str, blank lines included); .json: a list of strings or objects; .jsonl: one string or
    object per line ("" for a blank line); .csv: one {"prompt", ["categories"]} object per row (a `prompt` column is
    required). `what` names the file in errors ("input", "prompt set", "rewrites"); `formats` restricts the suffixes.
    Trailing blank lines of .txt/.jsonl come back as records too (`drop_trailing_blank` removes them)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in formats:
        raise PosiError(f"{path}: unsupported {what} format '{suffix or '(no extension)'}'; "
                        f"expected one of {', '.join(formats)}")
    if not path.is_file():
        raise PosiError(f"{path}: {what} not found")
    text = decode_utf8(path.read_bytes(), path)
    records: list[tuple[str, object]] = []
    if suffix == ".txt":
        records = [(f"{path}: line {n}", line) for n, line in enumerate(text.splitlines(), 1)]
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PosiError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(data, list):
            raise PosiError(f"{path}: expected a JSON list of strings or objects, got a {type(data).__name__}")
        records = [(f"{path}: record {i}", item) for i, item in enumerate(data)]
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            try:
                records.append((f"{path}: line {n}", json.loads(line) if line.strip() else ""))
            except json.JSONDecodeError as e:
                raise PosiError(f"{path}: line {n}: not valid JSON: {e.msg}") from None
    else:  # .csv
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            fields = [f for f in reader.fieldnames or [] if f is not None]
            lower = {f.strip().lower(): f for f in fields}
            if "prompt" not in lower:
                raise PosiError(f"{path}: no 'prompt' column in the CSV header (columns: {fields})")
            for row in reader:
                item = {"prompt": row.get(lower["prompt"]) or ""}
                if "categories" in lower:
                    item["categories"] = row.get(lower["categories"]) or ""
                records.append((f"{path}: line {reader.line_num}", item))
        except csv.Error as e:
            raise PosiError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from None
    return suffix, records


def drop_trailing_blank(suffix: str, records: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The records without the trailing blank lines of a .txt/.jsonl file (the end of the file, not entries)."""
    records = list(records)
    if suffix in (".txt", ".jsonl"):
        while records and isinstance(records[-1][1], str) and not records[-1][1].strip():
            records.pop()
    return records

