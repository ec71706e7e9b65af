"""LM tokenizer (byte-level BPE, or SentencePiece-style BPE from an HF folder's tokenizer.json) and chat template,
built from a GGUF's own fields or an HF tokenizer folder. `prompt_template` records which prompt format the model was
trained with (`posi_jax.policy.chat`); None: chosen automatically.

No torch and no transformers import at run time: the `tokenizers` library does the BPE, jinja2 the chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from posi_jax.errors import PosiError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special (never split by BPE)
# tokenizer_config.json key of the prompt format an exported model was trained with (other readers ignore it)
PROMPT_TEMPLATE_KEY = "posi_jax_prompt_template"


class Tokenizer:
    def __init__(self, backend, *, bos_id: int | None, eos_ids: tuple[int, ...], pad_id: int, chat_template: str | None,
                 bos_token: str = "", eos_token: str = "", add_bos: bool = True, prompt_template: str | None = None):
        self.backend = backend
        self.bos_id, self.eos_ids, self.pad_id = bos_id, tuple(eos_ids), pad_id
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos = add_bos  # HF's add_bos_token: whether a prompt format that starts with BOS writes one
        self.prompt_template = prompt_template  # "chat" | "default" | None (posi_jax.policy.chat.template_of)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, gguf_file) -> "Tokenizer":
        g = gguf_file
        model = g.require("tokenizer.ggml.model")
        if model != "gpt2":
            raise PosiError(f"{g.path}: tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' only)")
        tokens = list(g.require("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in g.require("tokenizer.ggml.merges")]
        types = list(g.field("tokenizer.ggml.token_type", [1] * len(tokens)))
        backend = byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges,
                                 [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)])
        bos = g.field("tokenizer.ggml.bos_token_id")
        eos = int(g.require("tokenizer.ggml.eos_token_id"))
        pad = g.field("tokenizer.ggml.padding_token_id", eos)
        return cls(backend, bos_id=None if bos is None else int(bos), eos_ids=(eos,), pad_id=int(pad),
                   chat_template=g.field("tokenizer.chat_template"),
                   bos_token=tokens[int(bos)] if bos is not None else "", eos_token=tokens[eos],
                   add_bos=bool(g.field("tokenizer.ggml.add_bos_token", False)))  # llama.cpp: off for gpt2 BPE

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """An HF tokenizer folder: tokenizer.json (as transformers saves it), or the legacy byte-level BPE files
        vocab.json + merges.txt; special tokens from tokenizer_config.json / special_tokens_map.json, the chat template
        from tokenizer_config.json, chat_template.jinja or chat_template.json."""
        from tokenizers import Tokenizer as Backend

        from posi_jax.weights.tokenizer_files import (TOKENIZER_JSON, read_bpe, read_chat_template,
                                                      read_special_tokens)

        folder = Path(folder)
        if not folder.is_dir():
            raise PosiError(f"{folder}: tokenizer folder not found")
        settings = read_special_tokens(folder)
        path = folder / TOKENIZER_JSON
        if path.is_file():
            try:
                backend = Backend.from_file(str(path))
            except Exception as e:
                raise PosiError(f"{path}: not a valid tokenizer file ({str(e).splitlines()[0]})") from None
        else:
            vocab, merges, _ = read_bpe(folder)  # errors name both layouts when neither is there
            backend = byte_level_bpe(vocab, merges, _legacy_special_tokens(folder, settings, vocab))
        eos_token = settings.get("eos_token") or ""
        bos_token = settings.get("bos_token") or ""
        pad_token = settings.get("pad_token") or eos_token
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        if eos_id is None:
            raise PosiError(f"{folder}: tokenizer_config.json / special_tokens_map.json name no usable eos_token")
        bos_id = backend.token_to_id(bos_token) if bos_token else None
        pad_id = backend.token_to_id(pad_token) if pad_token else eos_id
        return cls(backend, bos_id=bos_id, eos_ids=(eos_id,), pad_id=eos_id if pad_id is None else pad_id,
                   chat_template=read_chat_template(folder, settings), bos_token=bos_token, eos_token=eos_token,
                   add_bos=bool(settings.get("add_bos_token", True)), prompt_template=settings.get(PROMPT_TEMPLATE_KEY))

    def save(self, folder: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json (special tokens, chat template): what `from_folder` reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {"eos_token": self.eos_token or self.backend.id_to_token(self.eos_ids[0]),
               "pad_token": self.backend.id_to_token(self.pad_id), "bos_token": self.bos_token or None,
               "chat_template": self.chat_template, "tokenizer_class": "PreTrainedTokenizerFast",
               "add_bos_token": self.add_bos}
        if self.prompt_template is not None:
            cfg[PROMPT_TEMPLATE_KEY] = self.prompt_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # ---- text <-> ids ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise PosiError("this tokenizer has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def pad_left(self, rows: list[list[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded int32 ids [B, length] and their bool mask (generation continues at the right edge)."""
        length = max(len(r) for r in rows) if length is None else length
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), bool)
        for i, r in enumerate(rows):
            if r:
                ids[i, length - len(r):] = r
                mask[i, length - len(r):] = True
        return ids, mask


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], special: list[str]):
    """A `tokenizers` byte-level BPE (GPT-2 pre-tokenization and decoding) whose `special` tokens are never split."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return backend


def _legacy_special_tokens(folder: Path, settings: dict, vocab: dict[str, int]) -> list[str]:
    """The special tokens of a vocab.json + merges.txt folder (added to `vocab` where missing): transformers 4's
    `added_tokens_decoder`, added_tokens.json, `additional_special_tokens` and the named bos/eos/pad/unk tokens."""
    from posi_jax.weights.tokenizer_files import token_text

    found: dict[str, int | None] = {}
    for index, token in (settings.get("added_tokens_decoder") or {}).items():
        found[token_text(token)] = int(index)
    added = folder / "added_tokens.json"
    if added.is_file():
        found.update({t: int(i) for t, i in json.loads(added.read_text(encoding="utf-8")).items()})
    for token in settings.get("additional_special_tokens") or []:
        found.setdefault(token_text(token), None)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if settings.get(key):
            found.setdefault(settings[key], None)
    for token, index in found.items():
        if token not in vocab and index is not None:
            vocab[token] = index
    return [t for t in found if t in vocab]


def _raise_template_error(message):
    raise PosiError(f"chat template error: {message}")
