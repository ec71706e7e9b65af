"""A PPO run from a config (`python -m posi_jax.ppo`): the reward, the policy, the trainer, the loop, the summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

from posi_jax.checkpoints import load_policy
from posi_jax.config import changed_keys, parse_dtype, to_dict
from posi_jax.data.posi import load_prompts
from posi_jax.errors import PosiError
from posi_jax.nn import sharding as shd
from posi_jax.policy.chat import use_template
from posi_jax.rl.config import PPO_RUN_CONFIG, RESUME_MAY_CHANGE, PPORunConfig, RewardSettings, read_run_config
from posi_jax.rl.trainer import PPOTrainer, RewardFn, run
from posi_jax.training import checkpointing, distributed


def build_reward(settings: RewardSettings, mesh=None):
    from posi_jax.reward.q16 import load_q16_prompts

    if settings.kind == "tiny_random":
        from posi_jax.reward.tiny_random import tiny_random_reward

        prompts = load_q16_prompts(settings.q16_prompts) if settings.q16_prompts else None
        return tiny_random_reward(settings.config, seed=settings.weights_seed, q16_prompts=prompts, mesh=mesh)
    from posi_jax.reward.posi import PosiReward

    missing = [k for k in ("sd_folder", "q16_clip", "clip") if not getattr(settings, k)]
    if missing:
        raise PosiError(f"reward.kind posi needs reward.{', reward.'.join(missing)} (paths to the checkpoints)")
    return PosiReward.from_paths(settings.sd_folder, settings.q16_clip, settings.q16_prompts, settings.clip,
                                 settings.config, dtype=parse_dtype(settings.dtype, "reward.dtype"),
                                 mesh="auto" if mesh is None else mesh)


def trainer_from_config(cfg: PPORunConfig, reward_fn: RewardFn | None = None) -> PPOTrainer:
    distributed.initialize(cfg.distributed)
    prompts = load_prompts(cfg.prompts)
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    policy, tokenizer = load_policy(cfg.policy.checkpoint, dtype=parse_dtype(cfg.policy.dtype, "policy.dtype"),
                                    param_dtype=parse_dtype(cfg.policy.param_dtype, "policy.param_dtype"))
    use_template(tokenizer, cfg.template)
    if reward_fn is None:
        reward_fn = build_reward(cfg.reward, shd.data_mesh())
    return PPOTrainer(policy, tokenizer, reward_fn=reward_fn, prompts=prompts, ppo_cfg=cfg.ppo, optim=cfg.optim,
                      sampling=cfg.sampling, lora=cfg.lora, shared_backbone=cfg.shared_value_backbone,
                      value_head=cfg.value_head,
                      iterations=cfg.iterations, seed=cfg.seed, mesh=mesh, max_prompt_tokens=cfg.max_prompt_tokens)


def train(cfg: PPORunConfig, *, resume: bool = False, reward_fn: RewardFn | None = None,
          progress: bool = True) -> dict:
    """Build everything from the config, train, and return a summary (also written as out_dir/summary.json)."""
    out_dir = Path(cfg.out_dir)
    distributed.initialize(cfg.distributed)  # before check_run_dir: orbax's step listing starts JAX's backend
    check_run_dir(cfg, resume)  # before the setup (a minute with real models), and before anything is written
    t0 = time.perf_counter()
    trainer = trainer_from_config(cfg, reward_fn)
    t_setup = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():
        (out_dir / PPO_RUN_CONFIG).write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    t0 = time.perf_counter()
    history = run(trainer, out_dir, save_every=cfg.save_every, resume=resume, keep=cfg.keep_checkpoints,
                  progress=progress)
    summary = {"iterations": int(trainer.state.iteration), "iterations_this_run": len(history),
               "setup_s": round(t_setup, 2), "train_s": round(time.perf_counter() - t0, 2),
               "out_dir": str(out_dir), "checkpoint_step": int(trainer.state.iteration)}
    if history:
        summary.update({k: history[-1][k] for k in ("reward/mean", "objective/kl", "objective/kl_coef")})
        summary["reward/mean_first"] = history[0]["reward/mean"]
    if distributed.is_main_process():
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def check_run_dir(cfg: PPORunConfig, resume: bool) -> None:
    """A resumed run needs a checkpoint and the same config as before (but for RESUME_MAY_CHANGE); a new run needs an
    out_dir without checkpoints."""
    out_dir = Path(cfg.out_dir)
    step = checkpointing.latest_step(out_dir)
    if not resume:
        if step is not None:
            raise PosiError(f"{out_dir} already holds checkpoints: pass --resume, or choose another out_dir")
        return
    saved = out_dir / PPO_RUN_CONFIG
    if step is None or not saved.is_file():
        raise PosiError(f"{out_dir}: nothing to resume (no checkpoint in {out_dir / 'checkpoints'}"
                        + ("" if saved.is_file() else f", no {PPO_RUN_CONFIG}") + ")")
    # read_run_config: a setting added since the run was written reads as what the run did, not today's default
    changed = changed_keys(to_dict(read_run_config(out_dir)), cfg, RESUME_MAY_CHANGE)
    if changed:
        raise PosiError(f"{out_dir}: cannot resume with a different config: {', '.join(changed)} changed (a resumed "
                        f"run may change only {', '.join(RESUME_MAY_CHANGE)})")
