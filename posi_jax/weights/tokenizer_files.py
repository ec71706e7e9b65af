"""Hugging Face tokenizer folders, in both layouts found in the wild: the BPE vocabulary and merges, and the special-token
settings. The CLIP tokenizer (SD's `tokenizer/`, CLIP checkpoints) and the LM tokenizer read their folders here.

  legacy   vocab.json + merges.txt (+ special_tokens_map.json, tokenizer_config.json): hub SD / CLIP folders, and what
           transformers 4 wrote for slow tokenizers;
  current  tokenizer.json (+ tokenizer_config.json, chat_template.jinja): what transformers 5 writes (also for
           `StableDiffusionPipeline.save_pretrained`), with no vocab.json / merges.txt.
"""
from __future__ import annotations

import json
from pathlib import Path

from posi_jax.errors import PosiError

LEGACY_FILES = ("vocab.json", "merges.txt")
TOKENIZER_JSON = "tokenizer.json"


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / TOKENIZER_JSON).is_file() or all((folder / n).is_file() for n in LEGACY_FILES)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PosiError(f"{path}: invalid JSON ({e})") from None


def read_bpe(folder: str | Path) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    """(vocab, merges, the file they came from) of a BPE tokenizer folder: vocab.json + merges.txt when both are there,
    else the BPE model inside tokenizer.json (its added tokens included in the vocab)."""
    folder = Path(folder)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        vocab = _read_json(vocab_path)
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [i for i, m in enumerate(merges) if len(m) != 2]
        if bad:
            raise PosiError(f"{merges_path}: merge line {bad[0] + 1} is not two symbols")
        return vocab, merges, str(vocab_path)
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        raise PosiError(f"{folder}: no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt)")
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise PosiError(f"{path}: not a BPE tokenizer (model type {kind!r})")
    vocab = dict(model["vocab"])
    for added in data.get("added_tokens") or []:
        vocab.setdefault(added["content"], int(added["id"]))
    # tokenizers writes merges as "a b" strings (up to 0.19) or as [a, b] pairs (0.20 on)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if bad:
        raise PosiError(f"{path}: merge {bad[0]} is not two symbols")
    return vocab, merges, str(path)


def token_text(value) -> str | None:
    """A special token as written in the settings files: a string, or an AddedToken object {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def read_special_tokens(folder: str | Path) -> dict:
    """The folder's tokenizer settings: special_tokens_map.json (legacy) then tokenizer_config.json (later wins), with
    bos/eos/pad/unk tokens as plain strings."""
    folder = Path(folder)
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            data = _read_json(path)
            if not isinstance(data, dict):
                raise PosiError(f"{path}: expected a JSON object")
            settings.update({k: v for k, v in data.items() if v is not None})
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if key in settings:
            settings[key] = token_text(settings[key])
    return settings


def read_chat_template(folder: str | Path, settings: dict) -> str | None:
    """The chat template: tokenizer_config.json's `chat_template`, else chat_template.jinja (transformers ≥ 4.47),
    else chat_template.json (transformers 4.43-4.46)."""
    folder = Path(folder)
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template
