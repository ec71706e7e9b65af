"""Shared by the PPO trainer tests and the sharded-step subprocess: a word-level tokenizer, a tiny random policy,
prompts and the synthetic reward (+1 per occurrence of a chosen word in the rewritten prompt)."""
from __future__ import annotations

import numpy as np

WORDS = ["<pad>", "<eos>", "<unk>"] + [chr(ord("a") + i) for i in range(26)]
TARGET_WORD = "x"


def tiny_tokenizer():
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from posi_jax.policy.tokenizer import Tokenizer

    backend = Backend(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<eos>"])
    # The user turn only: the POSI system text would be a run of <unk> here.
    template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    return Tokenizer(backend, bos_id=None, eos_ids=(1,), pad_id=0, chat_template=template)


def tiny_config(**kw):
    from posi_jax.models.llama import LlamaConfig

    args = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                max_position_embeddings=64)
    return LlamaConfig(**{**args, **kw})


def tiny_policy(seed: int = 0, **kw):
    from flax import nnx

    from posi_jax.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(tiny_config(**kw), rngs=nnx.Rngs(seed))


def prompts(n: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(list("abcdefgh"), rng.integers(2, 6))) for _ in range(n)]


def count_reward(rewritten: list[str], original: list[str]) -> np.ndarray:
    del original
    return np.array([text.split().count(TARGET_WORD) for text in rewritten], np.float32)
