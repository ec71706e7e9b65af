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
