"""python -m posi_jax.ppo: bad configs fail with one line and exit 2 before anything is loaded; the shipped configs
parse."""
from __future__ import annotations

from pathlib import Path

import pytest

from posi_jax.errors import PosiError
from posi_jax.ppo import main
from posi_jax.rl.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv,message", [
    (["--config", "no/such.yaml"], "config file not found"),
    (["ppo.bogus=1"], "unknown config key(s) ppo.bogus"),
    (["sampling.top_p=3"], "top_p"),
    (["ppo.batch_size=6", "ppo.mini_batch_size=4"], "not a multiple of mini_batch_size"),
    (["reward.kind=dalle"], "reward.kind"),
    (["policy.dtype=float16", "prompts=" + str(REPO / "no.json")], "no.json"),
])
def test_bad_config_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_shipped_configs_parse():
    tiny = load_run_config(REPO / "configs" / "ppo_smollm2_tiny_sd.yaml")
    assert tiny.reward.kind == "tiny_random" and tiny.reward.config.seed_policy == "per_prompt"
    paper = load_run_config(REPO / "configs" / "ppo_llama7b_sd14.yaml", ["iterations=3"])
    assert paper.optim.learning_rate == 1.9e-5 and paper.ppo.ppo_epochs == 4 and paper.ppo.kl_target == 0.02
    assert paper.reward.config.images_per_prompt == 10 and paper.reward.config.guidance_scale == 7.0
    assert paper.iterations == 3
    with pytest.raises(PosiError, match="dtype"):
        from posi_jax.config import parse_dtype
        parse_dtype("float16", "policy.dtype")


def test_resume_is_checked_before_setup(tmp_path, capsys):
    """--resume needs a checkpoint and the run's own config (only RESUME_MAY_CHANGE may differ); a new run needs a folder
    without checkpoints. All checked before the minute of setup, and before ppo_config.json is written."""
    import json
    import time

    import jax.numpy as jnp

    from posi_jax.config import to_dict
    from posi_jax.rl.config import PPO_RUN_CONFIG
    from posi_jax.rl.run import check_run_dir
    from posi_jax.training import checkpointing

    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main([f"out_dir={out}", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not out.exists()
    cfg = load_run_config(None, [f"out_dir={out}", "ppo.cliprange=0.2"])
    checkpointing.save(out, 1, {"params": {"x": jnp.zeros(2)}})
    (out / PPO_RUN_CONFIG).write_text(json.dumps(to_dict(cfg)))
    check_run_dir(load_run_config(None, [f"out_dir={out}", "iterations=500", "save_every=5"]), resume=True)
    assert main([f"out_dir={out}", "ppo.cliprange=0.3", "sampling.top_p=0.9", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with a different config: ppo.cliprange, sampling.top_p changed" in err
    assert main([f"out_dir={out}"]) == 2
    assert "already holds checkpoints: pass --resume" in capsys.readouterr().err
    assert json.loads((out / PPO_RUN_CONFIG).read_text())["ppo"]["cliprange"] == 0.2  # not overwritten
    assert time.perf_counter() - t0 < 60
