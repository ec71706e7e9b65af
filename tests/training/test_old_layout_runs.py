"""Runs made by the previous package layout (tests/fixtures/old_layout, see its README) still load as policies and
resume with today's code; the SFT run's checkpoint equals a fresh run of today's code to the same step."""
from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from posi_jax.checkpoints import load_policy
from posi_jax.config import from_dict
from posi_jax.training import checkpointing
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "old_layout"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the runs name their data by paths relative to the repository root


def _copy(name, tmp_path):
    out = tmp_path / name
    shutil.copytree(FIXTURES / name, out)
    return out


@pytest.mark.slow
def test_old_sft_run_loads_resumes_and_matches_a_fresh_run(tmp_path, in_repo):
    from posi_jax.training.sft import SFT_RUN_CONFIG, SFTConfig, SFTTrainer

    run_dir = _copy("sft_run", tmp_path)
    assert checkpointing.latest_step(run_dir) == 2
    model, tokenizer = load_policy(run_dir)
    assert model.layers[0].self_attn.q_proj.lora is not None

    saved = from_dict(SFTConfig, json.loads((run_dir / SFT_RUN_CONFIG).read_text()))
    stored, _ = checkpointing.restore(run_dir, 2, {"params": jax.eval_shape(
        lambda: SFTTrainer(dataclasses.replace(saved, out_dir=str(tmp_path / "shape"))).checkpoint_items()["params"])})

    # today's code, from scratch to step 2: the same adapter as the old layout's checkpoint. The fixture was written on
    # another CPU, whose XLA kernels round differently in the last bits; Adam's normalisation lifts such differences in
    # near-zero gradient entries to ~1e-6 here. A step taken differently moves parameters by ~learning rate (1e-3).
    fresh = SFTTrainer(dataclasses.replace(saved, out_dir=str(tmp_path / "fresh")))
    fresh.run(stop_after_step=2)
    for a, b in zip(jax.tree.leaves(stored["params"]), jax.tree.leaves(fresh.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)

    resumed = SFTTrainer(dataclasses.replace(saved, out_dir=str(run_dir)))
    summary = resumed.run(resume=True)
    assert summary["step"] == 4 == resumed.total_steps
    assert checkpointing.latest_step(run_dir) == 4 and (run_dir / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [3, 4, 4]  # steps 3 and 4, then the final validation row


@pytest.mark.slow
def test_old_ppo_run_loads_and_resumes(tmp_path, in_repo):
    from posi_jax.rl.config import read_run_config
    from posi_jax.rl.run import train

    run_dir = _copy("ppo_run", tmp_path)
    # its prompts come from the POSI data (never committed): the run named a fixture file that was one
    saved = run_dir / "ppo_config.json"
    saved.write_text(saved.read_text().replace('"tests/fixtures/old_layout/ppo_prompts.json"', '"posi:ppo_prompts.json"'))
    model, _ = load_policy(run_dir)  # the run's SFT policy + its PPO adapter
    assert model.layers[0].self_attn.q_proj.lora is not None
    cfg = dataclasses.replace(read_run_config(run_dir), out_dir=str(run_dir), iterations=2)
    summary = train(cfg, resume=True, progress=False)
    assert summary["iterations"] == 2 and summary["iterations_this_run"] == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and np.isfinite(rows[-1]["reward/mean"])
