"""Resumable JSONL files: one JSON record per line, each flushed and fsynced before the write returns, under an
exclusive lock so two runs never append to one file. A crash can leave at most a last line without its newline;
`read_jsonl_records(repair=True)` cuts it off (that record is simply redone)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from posi_jax.errors import PosiError


def read_jsonl_records(path: Path, repair: bool, required: str = "input") -> tuple[list[dict], bool]:
    """(records, repaired) of a JSONL file written by `JsonlAppender`; every record must hold a `required` string.
    With `repair`, an incomplete last line is cut off the file. Any other bad line is an error naming it."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    repaired = False
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        if repair:
            os.truncate(path, cut)
        data, repaired = data[:cut], True
    records = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PosiError(f"{path}: line {lineno} is not a valid JSON record ({e}); fix or remove that line "
                            "before resuming") from None
        if not isinstance(record, dict) or not isinstance(record.get(required), str):
            raise PosiError(f"{path}: line {lineno} has no {required!r} string; is it a file this command wrote?")
        records.append(record)
    return records, repaired


class JsonlAppender:
    """Appends one JSON record per line; each line is flushed and fsynced before the call returns."""

    def __init__(self, path: Path, lock: bool, owner: str = "build_dataset"):
        """`owner` names the command in the error when another run holds the lock."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8", newline="\n")
        if lock:
            try:
                import fcntl

                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # not POSIX: no protection against two runs on one file
                pass
            except OSError:
                self._file.close()
                raise PosiError(f"{path}: another {owner} run is writing this file") from None

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
