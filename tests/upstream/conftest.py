"""Fixtures of the upstream-equivalence suite: a LLaMA-style SentencePiece tokenizer and a tiny random LLaMA folder
without a chat template (the paper's LLaMA-7B stand-in), trained on the POSI texts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from posi_jax.policy.chat import DEFAULT_SYSTEM


@pytest.fixture(scope="session")
def posi_texts(data_dir) -> list[str]:
    records = json.loads((data_dir / "sft_toxic_clean.json").read_text())[:400]
    return [DEFAULT_SYSTEM, "Human: hi\nAssistant:"] + [f"{r['instruction']}\n{r['input']}" for r in records] + \
        [r["output"] for r in records]


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory, posi_texts) -> Path:
    from tests.upstream.llama_fixtures import build_tiny_llama_folder

    return build_tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama7b"), posi_texts)


@pytest.fixture(scope="session")
def sentencepiece(llama_folder):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(llama_folder / "tokenizer.model"))
