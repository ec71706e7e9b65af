"""Run by test_sharding.py in a subprocess with 8 fake CPU devices: one PPO iteration (rollout + scoring + update) on
a 1-device mesh and on a data=2 x fsdp=4 mesh, from the same initial state; prints the differences as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.rl.sharded_ppo_step [full|lora] [shared|separate]
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np

from posi_jax.nn.sharding import make_mesh
from posi_jax.policy.sampler import SamplingConfig
from posi_jax.rl.config import LoRASettings, OptimSettings, PPOSettings
from posi_jax.rl.trainer import PPOTrainer
from tests.rl import ppo_setup


def trainer(mesh, lora: bool, shared: bool) -> PPOTrainer:
    ppo = PPOSettings(batch_size=16, mini_batch_size=8, gradient_accumulation_steps=1, ppo_epochs=2)
    return PPOTrainer(ppo_setup.tiny_policy(0), ppo_setup.tiny_tokenizer(), reward_fn=ppo_setup.count_reward,
                      prompts=ppo_setup.prompts(), ppo_cfg=ppo,
                      optim=OptimSettings(learning_rate=1e-4), sampling=SamplingConfig(max_new_tokens=8, top_p=1.0),
                      lora=LoRASettings(enabled=lora, rank=4, alpha=8.0), shared_backbone=shared, iterations=3,
                      mesh=mesh)


def main(mode: str = "full", value: str = "separate") -> None:
    assert jax.device_count() == 8, jax.devices()
    lora, shared = mode == "lora", value == "shared"
    one = trainer(make_mesh(devices=jax.devices()[:1]), lora, shared)
    eight = trainer(make_mesh(data=2, fsdp=4), lora, shared)
    sharded_leaves = sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                         for x in jax.tree.leaves(eight.state.params))
    out = {"mode": mode, "value": value, "sharded_param_leaves": int(sharded_leaves),
           "param_leaves": len(jax.tree.leaves(eight.state.params)), "steps": []}
    for _ in range(2):
        p0 = [np.asarray(x) for x in jax.tree.leaves(one.state.params)]
        m1, m8 = one.step(), eight.step()
        p1 = [np.asarray(x) for x in jax.tree.leaves(one.state.params)]
        p8 = [np.asarray(x) for x in jax.tree.leaves(eight.state.params)]
        keys = [k for k in m1 if k.startswith(("ppo/", "objective/", "reward/"))]
        out["steps"].append({
            "same_texts": one.last_texts == eight.last_texts,
            "loss": [m1["ppo/loss"], m8["ppo/loss"]],
            "metric_diffs": {k: abs(m1[k] - m8[k]) for k in keys},
            "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8)),
            "max_param_change": max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p0)),
            "still_sharded": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
                jax.tree.leaves(eight.state), jax.tree.leaves(eight.state_shardings))),
        })
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
