"""A LLaMA-7B stand-in for the upstream-equivalence tests: a tiny SentencePiece BPE model trained here with LLaMA's
options (byte fallback, identity normalisation, dummy prefix, split digits, <unk>/<s>/</s> = 0/1/2), its fast
tokenizer.json laid out as huggyllama/llama-7b ships it (`llama_fast_tokenizer`), a
tokenizer_config.json like LLaMA-7B's (no chat template, no pad token, add_bos_token) and a tiny random
LlamaForCausalLM saved by transformers."""
from __future__ import annotations

import io
import json
from pathlib import Path

# LLaMA-7B's tokenizer_config.json fields that matter here (huggyllama/llama-7b): no chat template, no pad token.
TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                    "add_eos_token": False, "pad_token": None, "tokenizer_class": "LlamaTokenizer"}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def train_sentencepiece(texts: list[str], vocab_size: int = 600) -> bytes:
    """A serialized SentencePiece BPE model with LLaMA's trainer options."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return model.getvalue()


def llama_fast_tokenizer(model_file: Path):
    """The fast (tokenizers) form of a LLaMA SentencePiece model, laid out as huggyllama/llama-7b's tokenizer.json
    (transformers' legacy LlamaConverter): BPE with byte fallback over the model's pieces and merges (extracted by
    transformers' SentencePieceExtractor), a normaliser that prepends "▁" and turns spaces into "▁", and the decoder
    that undoes it."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    pieces = SentencePieceExtractor(str(model_file)).extract(None)
    tok = Tokenizer(BPE(pieces["vocab"], pieces["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tok


def write_llama_tokenizer(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece(texts))
    llama_fast_tokenizer(folder / "tokenizer.model").save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return folder


def build_tiny_llama_folder(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """tokenizer.model + tokenizer.json + tokenizer_config.json + config.json + model.safetensors."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    write_llama_tokenizer(folder, texts)
    vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **TINY))
    model.save_pretrained(folder, safe_serialization=True)
    return folder
