"""Sharded PPO on 8 fake CPU devices equals the single-device run; the FSDP partition rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jax.sharding import PartitionSpec as P

from posi_jax.nn.sharding import fsdp_spec

REPO = Path(__file__).resolve().parents[2]


def test_fsdp_spec():
    assert fsdp_spec((49152, 576), 4) == P("fsdp", None)  # the largest divisible axis
    assert fsdp_spec((576, 1536), 4) == P(None, "fsdp")
    assert fsdp_spec((30, 7), 4) == P()  # nothing divisible: replicated
    assert fsdp_spec((64, 8), 1) == P()
    assert fsdp_spec((), 4) == P()


def test_eight_device_step_equals_one_device_step():
    """Default PPO setup (LoRA policy, separate value model over the shared frozen base): two iterations (rollout,
    scoring, 2 epochs x 2 minibatches of updates) on a data=2 x fsdp=4 mesh vs one device, same initial state."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.rl.sharded_ppo_step", "lora", "separate"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"\n{json.dumps(result)[:1500]}")
    assert result["sharded_param_leaves"] >= result["param_leaves"] // 2  # the state really is spread over 8 devices
    for step in result["steps"]:
        assert step["same_texts"]  # the sharded rollout sampled the same responses
        assert abs(step["loss"][0] - step["loss"][1]) <= 1e-5
        assert step["max_param_diff"] <= 1e-5 and step["max_param_change"] > 1e-4  # the update moved the params
        assert step["still_sharded"]  # the updated state kept its FSDP layout
        # explained_variance = 1 - Var(res)/Var(returns) is ill-conditioned when the value fits well: not compared.
        diffs = {k: v for k, v in step["metric_diffs"].items() if "explained_variance" not in k}
        assert max(diffs.values()) <= 1e-5, diffs
