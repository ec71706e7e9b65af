"""The paper's configs end to end on CPU: configs/sft_llama7b_lora.yaml, then configs/ppo_llama7b_sd14.yaml on its
SFT run, with a tiny random LLaMA folder that has no chat template standing in for LLaMA-7B. Only sizes are overridden
(steps, batch, lengths, the reward's models: tiny random SD/CLIPs in memory); every other setting is the config's:
the `default` template, LoRA dropout kept on in PPO, the shared value head with TRL's dropout and init, raw-logit
log-probs, responses without EOS, the ratio threshold, the per-iteration cosine over schedule_steps, fixed seed-0
noise, the CLIP text cut at 77 characters."""
from __future__ import annotations

import json

import pytest

from posi_jax.config import load_config
from posi_jax.rl.config import load_run_config
from posi_jax.training.sft import SFTConfig

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def test_paper_configs_hold_upstream_values():
    sft = load_config(SFTConfig, REPO_CONFIGS / "sft_llama7b_lora.yaml")
    assert (sft.template, sft.lora_rank, sft.lora_alpha, sft.lora_dropout, sft.learning_rate, sft.batch_size,
            sft.grad_accum, sft.epochs, sft.cutoff_len, sft.val_size) == ("default", 8, 16.0, 0.1, 5e-5, 4, 4, 3, 1024, 0)
    ppo = load_run_config(REPO_CONFIGS / "ppo_llama7b_sd14.yaml")
    assert ppo.template == "default" and ppo.lora.dropout == 0.1 and ppo.shared_value_backbone
    assert (ppo.value_head.init, ppo.value_head.dropout) == ("torch_default", 0.1)
    s = ppo.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.greedy) == (512, 0.95, 0.7, 50, False)
    p = ppo.ppo
    assert (p.batch_size, p.mini_batch_size, p.gradient_accumulation_steps, p.num_minibatches, p.ppo_epochs) == \
        (16, 16, 4, 1, 4)  # TRL 0.7's mini-batch 4 x accumulation 4: one optimizer step per epoch
    assert (p.score_temperature, p.eos_in_response, p.ratio_threshold, p.cliprange, p.cliprange_value, p.vf_coef,
            p.gamma, p.lam, p.init_kl_coef, p.kl_target, p.kl_horizon, p.adaptive_kl, p.kl_penalty) == \
        (1.0, False, 10.0, 0.2, 0.2, 0.1, 1.0, 0.95, 0.2, 0.02, 10000.0, True, "k1")
    o = ppo.optim
    assert (o.learning_rate, o.weight_decay, o.b1, o.b2, o.eps, o.max_grad_norm, o.schedule, o.schedule_unit,
            o.schedule_steps, o.warmup_steps) == (1.9e-5, 0.01, 0.9, 0.999, 1e-8, 1.0, "cosine", "iteration", 53, 0)
    r = ppo.reward.config
    assert (r.images_per_prompt, r.steps, r.guidance_scale, r.seed_policy, r.seed, r.clip_text_chars,
            r.uint8_round_trip, r.w, r.cap, r.alignment_text) == (10, 50, 7.0, "fixed", 0, 77, True, 5.0, 0.31,
                                                                   "rewritten")
    assert ppo.iterations == 52  # 842 prompts // 16: TRL's loader drops the last partial batch


@pytest.mark.slow
def test_sft_then_ppo_configs_run_end_to_end(tmp_path, llama_folder, data_dir):
    from posi_jax import ppo as ppo_cmd
    from posi_jax import sft as sft_cmd
    from posi_jax.checkpoints import load_policy
    from posi_jax.policy.chat import template_of

    # a small slice of the real pairs (the config's data URL is replaced, as on a machine without network)
    pairs = json.loads((data_dir / "sft_toxic_clean.json").read_text())[:24]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    sft_dir = tmp_path / "sft"
    assert sft_cmd.main(["--config", str(REPO_CONFIGS / "sft_llama7b_lora.yaml"), f"base={llama_folder}",
                         f"data={tmp_path / 'pairs.json'}", f"out_dir={sft_dir}", "max_steps=2", "batch_size=2",
                         "grad_accum=2", "cutoff_len=256", "pad_multiple=256", "progress=false"]) == 0
    adapter = json.loads((sft_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["template"] == "default" and adapter["dropout"] == 0.1
    _, tokenizer = load_policy(sft_dir)
    assert template_of(tokenizer) == "default"

    ppo_dir = tmp_path / "ppo"
    assert ppo_cmd.main(["--config", str(REPO_CONFIGS / "ppo_llama7b_sd14.yaml"), f"policy.checkpoint={sft_dir}",
                         f"prompts={data_dir / 'ppo_prompts.json'}", "max_prompts=8", "ppo.batch_size=4",
                         "ppo.mini_batch_size=4", "ppo.gradient_accumulation_steps=2", "ppo.logprob_chunk_size=0",
                         "sampling.max_new_tokens=8", "policy.dtype=float32", "policy.param_dtype=float32",
                         "reward.kind=tiny_random", f"reward.q16_prompts={data_dir / 'q16_prompts.p'}",
                         "reward.dtype=float32", "reward.config.images_per_prompt=2", "reward.config.steps=2",
                         "reward.config.prompt_batch=null", "mesh.fsdp=1", "iterations=2", "save_every=2",
                         f"out_dir={ppo_dir}", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward/mean", "ppo/loss", "objective/kl", "ppo/skipped"):
            assert isinstance(r[key], float) and r[key] == r[key], (key, r)
    saved = json.loads((ppo_dir / "ppo_config.json").read_text())
    assert saved["template"] == "default" and saved["ppo"]["eos_in_response"] is False
    _, tokenizer = load_policy(ppo_dir)  # the PPO run as a checkpoint: the same prompt format
    assert template_of(tokenizer) == "default"
