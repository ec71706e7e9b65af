"""Shared fixtures: the real SmolLM2 GGUF, the POSI data folder, a tiny random LLaMA folder written by transformers."""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

# Parity tests compare fp32 numbers: keep XLA from using lower-precision matmul paths.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("POSI_DATA", REPO.parent / "shared" / "data" / "posi"))


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_executables():
    """Each test module leaves JAX's compilation caches empty. Every executable XLA:CPU keeps alive holds ~3-6 memory
    mappings of JIT code, and module-level `jax.jit` caches keep every shape a test ever used: over the whole suite in
    one process that passed Linux's `vm.max_map_count` (65530), and LLVM segfaulted inside the next compile (at
    tests/training/test_report.py, test ~512 of 574, in CI and here). Services and training runs compile a fixed set of
    shapes, so only a suite reaches that limit."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "sft_toxic_clean.json").is_file():
        pytest.fail(f"POSI data not found at {DATA_DIR} (set POSI_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from posi_jax.policy.load import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    from posi_jax.policy.tokenizer import Tokenizer
    from posi_jax.weights.gguf import GGUFFile

    return Tokenizer.from_gguf(GGUFFile(smollm2_gguf))


TINY_LLAMA = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rope_theta=5000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A small random GQA LLaMA with untied embeddings, saved by transformers, with SmolLM2's tokenizer and template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    model.save_pretrained(folder, safe_serialization=True)
    smollm2_tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>",
        "chat_template": smollm2_tokenizer.chat_template}))
    return folder


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """A tiny random SD v1-style diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json),
    8x8 latents / 64x64 images, loadable by diffusers' StableDiffusionPipeline and by posi_jax.weights.sd."""
    from tests.sd_fixtures import build_tiny_sd_folder

    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"), "v1")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory) -> Path:
    """The SD v2-style variant: linear proj_in/proj_out, per-block attention_head_dim, gelu text encoder."""
    from tests.sd_fixtures import build_tiny_sd_folder

    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd2"), "v2")


@pytest.fixture(scope="session")
def tiny_sd_checker_folder(tiny_sd_folder, tmp_path_factory) -> Path:
    """tiny_sd_folder plus a tiny random safety_checker/ and feature_extractor/ (32 px input), its thresholds
    calibrated on the folder's own 32 px images so that some are flagged and some are not."""
    from tests.sd_fixtures import copy_with_safety_checker

    return copy_with_safety_checker(tiny_sd_folder, tmp_path_factory.mktemp("tiny_sd_checker"))


@pytest.fixture
def fake(monkeypatch):
    """A real OpenAI-compatible HTTP server on loopback (tests/fake_openai_server.py), with the key in the env."""
    from tests.fake_openai_server import FakeOpenAI

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    server = FakeOpenAI().start()
    yield server
    server.stop()


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def default_sigint() -> None:
    """`preexec_fn` for a CLI subprocess a test will Ctrl-C: SIGINT back to its default disposition. A test run
    started in the background (`&`, nohup, some CI runners) ignores SIGINT, and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
