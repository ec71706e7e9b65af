"""The evaluation's inputs: a prompt set (with I2P-style categories when it has them) and, optionally, precomputed
rewrites in the same order. Both are read by the one prompt-file parser (`posi_jax.data.prompt_files`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from posi_jax.data.posi import posi_or_path
from posi_jax.data.prompt_files import drop_trailing_blank, prompt_from_item, read_prompt_records
from posi_jax.errors import PosiError


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    categories: tuple[str, ...] = ()  # I2P's `categories` ("sexual,violence"), when the prompt set has them


def _categories_of(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise PosiError(f"{where}: 'categories' must be a string or a list of strings, got {value!r:.80}")
    return tuple(dict.fromkeys(c.strip().lower() for c in items if c.strip()))


def read_prompt_set(path: str | os.PathLike) -> list[EvalPrompt]:
    """A prompt set: .txt (one prompt per line), .json (a list of strings, POSI records {instruction, input, output}
    or objects with a 'prompt'), .jsonl (one string or object per line) or .csv (a 'prompt' column, as I2P's CSV).
    Objects and CSV rows may carry 'categories'. Empty prompts are errors naming the line or record: in an
    evaluation a silently dropped prompt changes the numbers. Duplicates are kept (each is one evaluated prompt)."""
    items = drop_trailing_blank(*read_prompt_records(posi_or_path(path), "prompt set"))  # e.g. posi:test_data.json
    if not items:
        raise PosiError(f"{path}: no prompts")
    prompts = []
    for where, item in items:
        prompt = prompt_from_item(item, where)
        if not prompt.strip():
            raise PosiError(f"{where} is empty (every line/record must hold a prompt)")
        cats = _categories_of(item.get("categories"), where) if isinstance(item, dict) else ()
        prompts.append(EvalPrompt(" ".join(prompt.split()), cats))
    return prompts


def read_rewrites(path: str | os.PathLike, prompts: Sequence[EvalPrompt]) -> list[str]:
    """Precomputed rewrites, in the prompt set's order: .txt (one per line), .json (a list of strings, or POSI
    records / objects with 'output' or 'rewritten'), or .jsonl (e.g. `python -m posi_jax.rewrite --json` output).
    Where a record names its original ('input' / 'original'), it must be the prompt at that position."""
    items = drop_trailing_blank(*read_prompt_records(path, "rewrites", formats=(".txt", ".json", ".jsonl")))
    if len(items) != len(prompts):
        raise PosiError(f"{path}: {len(items)} rewrites for {len(prompts)} prompts; they must pair up in order")
    rewrites = []
    for (where, item), p in zip(items, prompts):
        if isinstance(item, dict):
            original = item.get("input", item.get("original"))
            if isinstance(original, str) and " ".join(original.split()) != p.prompt:
                raise PosiError(f"{where}: is the rewrite of {original[:60]!r}, but the prompt at this position is "
                                f"{p.prompt[:60]!r}")
            item = item.get("output", item.get("rewritten"))
        if not isinstance(item, str):
            raise PosiError(f"{where}: expected a rewrite string (or an object with 'output' / 'rewritten'), "
                            f"got {type(item).__name__}")
        if not item.strip():
            raise PosiError(f"{where} is an empty rewrite")
        rewrites.append(" ".join(item.split()))
    return rewrites

