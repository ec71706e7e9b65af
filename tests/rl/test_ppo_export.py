"""A PPO run folder as a rewriter: `load_policy(run_dir)` rebuilds the trained policy (SFT adapter merged + the PPO
adapter of the latest checkpoint) with the trainer's logits; `python -m posi_jax.ppo export` writes an HF folder that
load_policy and transformers read with the same logits; a run without a checkpoint is a clear PosiError."""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posi_jax.policy.adapters import save_adapter
from posi_jax.checkpoints import load_policy
from posi_jax.errors import PosiError
from posi_jax.nn.lora import LoRAParam, add_lora
from posi_jax.ppo import main
from posi_jax.rl.config import PPO_RUN_CONFIG, load_run_config
from posi_jax.rl.run import train, trainer_from_config
from posi_jax.weights.llama import save_llama_safetensors
from tests.conftest import max_abs
from tests.rl import ppo_setup


@nnx.jit
def _logits(model, tokens, mask):
    return model(tokens, attention_mask=mask)[0]


def _batch():
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(3, len(ppo_setup.WORDS), (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), bool).at[1, :3].set(False)  # one left-padded row
    return tokens, mask


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """SFT policy = tiny base (HF folder) + a trained-looking LoRA adapter; 2 PPO iterations on the synthetic reward."""
    root = tmp_path_factory.mktemp("ppo_export")
    tokenizer = ppo_setup.tiny_tokenizer()
    model = ppo_setup.tiny_policy(0)
    save_llama_safetensors(model, root / "base", tokenizer)
    add_lora(model, ("q_proj", "v_proj"), rank=2, alpha=4.0, dropout=0.0, seed=1)
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, LoRAParam):
            var[...] = 0.3 * jax.random.normal(jax.random.key(i), var.shape)
    save_adapter(model, root / "sft", targets=("q_proj", "v_proj"), rank=2, alpha=4.0, dropout=0.0,
                 base=str(root / "base"))
    (root / "prompts.json").write_text(json.dumps([{"instruction": "rewrite", "input": p}
                                                   for p in ppo_setup.prompts(12)]))
    cfg = load_run_config(None, [f"policy.checkpoint={root / 'sft'}", f"prompts={root / 'prompts.json'}",
                                 f"out_dir={root / 'run'}", "iterations=2", "save_every=1", "ppo.batch_size=4",
                                 "ppo.mini_batch_size=4", "ppo.ppo_epochs=2", "sampling.max_new_tokens=6",
                                 "sampling.top_p=1.0", "lora.rank=4", "lora.alpha=8", "optim.learning_rate=0.05",
                                 "optim.schedule=constant"])
    summary = train(cfg, reward_fn=ppo_setup.count_reward, progress=False)
    assert summary["iterations"] == 2
    return cfg, root


def test_run_dir_loads_as_the_trained_policy(ppo_run):
    cfg, root = ppo_run
    run = root / "run"
    assert (run / PPO_RUN_CONFIG).is_file() and (run / "checkpoints" / "2").is_dir()
    trainer = trainer_from_config(cfg, ppo_setup.count_reward)
    assert trainer.restore(run) == 2
    tokens, mask = _batch()
    want = _logits(trainer.policy_model(), tokens, mask)
    policy, tokenizer = load_policy(run)
    got = _logits(policy, tokens, mask)
    err = max_abs(got, want)
    print(f"load_policy(run_dir) vs trainer.policy_model(): max |dlogits| = {err:.2e}")
    assert err <= 1e-5, err
    assert tokenizer.eos_ids == (1,) and tokenizer.pad_id == 0
    # The PPO adapter was trained and is what load_policy applied: the SFT policy alone gives other logits.
    sft, _ = load_policy(root / "sft")
    assert max_abs(_logits(sft, tokens, mask), want) > 1e-3
    adapter_b = [np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(policy, LoRAParam)) if p[-1] == "lora_b"]
    assert adapter_b and max(float(np.abs(b).max()) for b in adapter_b) > 0
    # An earlier checkpoint is a different policy (so the latest one was picked).
    from posi_jax.checkpoints import load_ppo_run_policy as load_run_policy

    first, _ = load_run_policy(run, step=1)
    assert max_abs(_logits(first, tokens, mask), want) > 1e-6


def test_export_folder_has_the_same_logits(ppo_run, tmp_path, capsys):
    import torch
    from transformers import LlamaForCausalLM as TorchLlama

    _, root = ppo_run
    tokens, mask = _batch()
    want = _logits(load_policy(root / "run")[0], tokens, mask)
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    exported, tokenizer = load_policy(tmp_path / "hf")
    err = max_abs(_logits(exported, tokens, mask), want)
    print(f"exported HF folder vs run dir (load_policy): max |dlogits| = {err:.2e}")
    assert err <= 1e-5, err
    assert tokenizer.eos_ids == (1,)
    ref = TorchLlama.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        hf = ref(torch.tensor(np.asarray(tokens[:1]))).logits.numpy()  # unpadded row (HF pads differently)
    err_hf = max_abs(hf, want[:1])
    print(f"exported HF folder in transformers vs run dir: max |dlogits| = {err_hf:.2e}")
    assert err_hf <= 1e-4, err_hf


def test_full_finetune_run_with_shared_value_head(ppo_run, tmp_path):
    """lora.enabled=false (all weights trained, restored from the checkpoint) and a value head on the policy."""
    cfg, root = ppo_run
    full = load_run_config(None, [f"policy.checkpoint={root / 'sft'}", f"prompts={root / 'prompts.json'}",
                                  f"out_dir={tmp_path / 'run'}", "iterations=1", "ppo.batch_size=4",
                                  "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "sampling.max_new_tokens=6",
                                  "sampling.top_p=1.0", "lora.enabled=false", "shared_value_backbone=true",
                                  "optim.learning_rate=0.01", "optim.schedule=constant"])
    train(full, reward_fn=ppo_setup.count_reward, progress=False)
    trainer = trainer_from_config(full, ppo_setup.count_reward)
    assert trainer.restore(tmp_path / "run") == 1
    tokens, mask = _batch()
    want = _logits(trainer.policy_model(), tokens, mask)
    policy, _ = load_policy(tmp_path / "run")
    assert not jax.tree.leaves(nnx.state(policy, LoRAParam))
    err = max_abs(_logits(policy, tokens, mask), want)
    print(f"full fine-tune run: load_policy vs trainer.policy_model(): max |dlogits| = {err:.2e}")
    assert err <= 1e-5, err
    assert max_abs(_logits(load_policy(root / "sft")[0], tokens, mask), want) > 1e-3


def test_run_without_checkpoint_is_a_clear_error(ppo_run, tmp_path, capsys):
    _, root = ppo_run
    empty = tmp_path / "fresh_run"
    empty.mkdir()
    shutil.copy(root / "run" / PPO_RUN_CONFIG, empty / PPO_RUN_CONFIG)
    with pytest.raises(PosiError, match=r"fresh_run: PPO run has no checkpoint under .*checkpoints"):
        load_policy(empty)
    assert main(["export", str(empty), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no checkpoint" in err and err.count("\n") == 1
    assert main(["export", str(root / "sft"), "--out", str(tmp_path / "hf")]) == 2
    assert "not a PPO run folder" in capsys.readouterr().err
    (empty / PPO_RUN_CONFIG).write_text("{not json")
    with pytest.raises(PosiError, match="cannot read the PPO run config"):
        load_policy(empty)
    assert not (tmp_path / "hf").exists()
