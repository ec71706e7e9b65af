"""CLIP byte-level BPE tokenization (77 tokens: SOT, text, EOT, padding), built on the `tokenizers` library.

Two vocab sources and two text-cleaning conventions, each matching its reference exactly:
  from_open_clip()   OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped in posi_jax/assets/clip, the same file as
                     open_clip_torch's), cleaned like open_clip: ftfy.fix_text, html.unescape twice, whitespace collapse,
                     lowercase. Padding id 0. Used for Q16 / CLIP score, as upstream.
  from_folder(path)  an HF `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json as current transformers
                     writes it) as in SD diffusers folders and CLIP checkpoints, cleaned like
                     transformers' CLIPTokenizer: NFC, whitespace collapse, lowercase. Padding id from the folder's
                     tokenizer_config.json / special_tokens_map.json (SD v1: <|endoftext|>; SD v2: "!" = 0).
Truncation keeps SOT and ends with EOT, as both references do.
"""
from __future__ import annotations

import gzip
import html
from pathlib import Path

import numpy as np

from posi_jax.errors import PosiError

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
# CLIP's pre-tokenization regex: contractions, letter runs, single digits, runs of other non-space symbols.
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_OPEN_CLIP_MERGES = 49152 - 256 - 2  # open_clip reads this many merge lines after the header
OPENAI_BPE_PATH = Path(__file__).resolve().parents[1] / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _open_clip_clean(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        raise PosiError("open_clip-style text cleaning needs the `ftfy` package: pip install ftfy") \
            from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, clean: str = "hf",
                 pad_token_id: int = 0, context_length: int = 77, source: str = "<memory>"):
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        if clean not in ("hf", "open_clip"):
            raise PosiError(f"{source}: unknown cleaning {clean!r} (hf, open_clip)")
        for special in (SOT, EOT):
            if special not in vocab:
                raise PosiError(f"{source}: vocabulary has no {special} token")
        self.sot_token_id = vocab[SOT]
        self.eot_token_id = vocab[EOT]
        self.pad_token_id = pad_token_id
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.clean = clean
        try:
            bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                             fuse_unk=False, unk_token=EOT)
        except Exception as e:
            raise PosiError(f"{source}: invalid BPE vocabulary/merges ({e})") from None
        tok = Tokenizer(bpe)
        if clean == "hf":
            tok.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # (open_clip cleaning happens in Python first, exactly as open_clip does it)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            # pieces are already finer than GPT-2's regex would cut them: map bytes only
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self._tok = tok

    # ---- constructors ----------------------------------------------------------------------------------------------
    @classmethod
    def from_open_clip(cls, context_length: int = 77) -> "CLIPTokenizer":
        """OpenAI's CLIP tokenizer (`clip.tokenize`, open_clip's `tokenize`) from the merges file shipped in
        posi_jax/assets/clip (the same file open_clip_torch ships; see its README there)."""
        return cls.from_bpe_file(str(OPENAI_BPE_PATH), context_length=context_length)

    @classmethod
    def from_bpe_file(cls, path: str, context_length: int = 77) -> "CLIPTokenizer":
        """OpenAI's gzipped merges file: the vocab is the 256 byte symbols, the same with </w>, the merges, SOT, EOT."""
        try:
            with gzip.open(path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise PosiError(f"{path}: cannot read BPE merges ({e})") from None
        merges = [tuple(line.split()) for line in lines[1:_OPEN_CLIP_MERGES + 1]]
        if len(merges) != _OPEN_CLIP_MERGES or any(len(m) != 2 for m in merges):
            raise PosiError(f"{path}: expected {_OPEN_CLIP_MERGES} merge lines of two symbols")
        symbols = list(_bytes_to_unicode().values())
        symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        vocab = {s: i for i, s in enumerate(symbols)}
        return cls(vocab, merges, clean="open_clip", pad_token_id=0, context_length=context_length, source=path)

    @classmethod
    def from_folder(cls, folder: str, context_length: int | None = None) -> "CLIPTokenizer":
        """An HF CLIP tokenizer folder in either layout (vocab.json + merges.txt, or tokenizer.json alone as current
        transformers saves it): the same vocabulary and merges, so the same ids (see weights/tokenizer_files.py)."""
        from posi_jax.weights.tokenizer_files import read_bpe, read_special_tokens

        vocab, merges, source = read_bpe(folder)
        settings = read_special_tokens(folder)
        pad = settings.get("pad_token") or EOT
        if pad not in vocab:
            raise PosiError(f"{folder}: pad token {pad!r} is not in the vocabulary ({source})")
        ctx = context_length or int(min(settings.get("model_max_length", 77), 77))
        return cls(vocab, merges, clean="hf", pad_token_id=vocab[pad], context_length=ctx, source=folder)

    # ---- tokenization ----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        if self.clean == "open_clip":
            text = _open_clip_clean(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: list[str] | str, context_length: int | None = None) -> np.ndarray:
        """int32 [B, context_length]: SOT, ids, EOT, padding; too-long texts are cut and still end with EOT."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise PosiError("CLIPTokenizer: texts must be strings")
        ctx = context_length or self.context_length
        if ctx < 2:
            raise PosiError(f"CLIPTokenizer: context_length {ctx} leaves no room for SOT and EOT")
        if self.clean == "open_clip":
            texts = [_open_clip_clean(t) for t in texts]
        encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        out = np.full((len(texts), ctx), self.pad_token_id, np.int32)
        for i, enc in enumerate(encoded):
            ids = [self.sot_token_id] + enc.ids[: ctx - 2] + [self.eot_token_id]
            out[i, : len(ids)] = ids
        return out
