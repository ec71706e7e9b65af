"""The PPO trainer and its loop: rollout with the jitted sampler -> reward -> `rl.steps` (scoring, update) -> KL
controller, metrics (JSONL + TensorBoard, training/metrics.py; progress bar) and orbax checkpoints.

One iteration, as TRL's PPOTrainer.step (which POSI used), with the math of `rl/ppo.py`:
  prompts -> generate (policy/sampler.py) -> texts -> reward_fn(rewritten, original) -> scores [B]
  -> score_rollout -> ppo_update -> KL controller update.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from posi_jax.data.posi import POSI_INSTRUCTION
from posi_jax.errors import PosiError
from posi_jax.models.llama import LlamaForCausalLM
from posi_jax.nn import sharding as shd
from posi_jax.policy.chat import request_ids, response_text
from posi_jax.policy.sampler import SamplingConfig, generate
from posi_jax.rl.config import LoRASettings, OptimSettings, PPOSettings, ValueHeadSettings
from posi_jax.rl.kl import make_kl_controller
from posi_jax.rl.models import build_models
from posi_jax.rl.ppo import drop_final_eos
from posi_jax.rl.steps import (StepSpec, TrainState, make_optimizer, ppo_update, scheduled_learning_rate,
                               score_rollout)
from posi_jax.training import checkpointing, distributed
from posi_jax.training.metrics import MetricsWriter

RewardFn = Callable[[list[str], list[str]], Any]  # (rewritten, original) -> scores [B] (or an object with .reward)


class PPOTrainer:
    """Owns the jitted functions; the loop (`run`) and checkpointing are thin Python around them.

    `tokenizer` is a posi_jax Tokenizer: prompts go through the policy's prompt format and responses through its
    cleaning (`posi_jax.policy.chat`), as in the rewriter. `reward_fn(rewritten, original)` returns scores [B] (or an object with a `.reward` field
    and other per-prompt fields, logged as reward components).
    """

    def __init__(self, policy: LlamaForCausalLM, tokenizer, *, reward_fn: RewardFn, prompts: list[str],
                 ppo_cfg: PPOSettings = PPOSettings(),
                 optim: OptimSettings = OptimSettings(), sampling: SamplingConfig = SamplingConfig(),
                 lora: LoRASettings = LoRASettings(), shared_backbone: bool = False,
                 value_head: ValueHeadSettings = ValueHeadSettings(), iterations: int = 100,
                 seed: int = 0, mesh=None, max_prompt_tokens: int = 256, prompt_length: int | None = None):
        if not prompts:
            raise PosiError("PPO needs at least one prompt")
        self.cfg, self.optim_cfg, self.sampling = ppo_cfg, optim, sampling
        self.reward_fn, self.tokenizer = reward_fn, tokenizer
        self.eos_ids, self.pad_id = tuple(int(e) for e in tokenizer.eos_ids), int(tokenizer.pad_id)
        self.iterations, self.seed = iterations, seed
        self.mesh = shd.make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
        shd.check_batch(ppo_cfg.batch_size, self.mesh, "ppo.batch_size")
        shd.check_batch(ppo_cfg.micro_batch_size, self.mesh, "the micro-batch (mini_batch_size / accumulation)")
        self.prompts = list(prompts)
        self.prompt_rows = [request_ids(tokenizer, POSI_INSTRUCTION, p, max_prompt_tokens) for p in self.prompts]
        longest = max(len(r) for r in self.prompt_rows)
        self.prompt_length = prompt_length or -(-longest // 8) * 8  # one compiled shape for the whole run
        if longest > self.prompt_length:
            raise PosiError(f"a prompt has {longest} tokens, more than prompt_length {self.prompt_length}")
        limit = policy.config.max_position_embeddings
        if self.prompt_length + sampling.max_new_tokens > limit:
            raise PosiError(f"prompt_length {self.prompt_length} + max_new_tokens {sampling.max_new_tokens} exceed the "
                            f"policy's context of {limit}")
        self.kl_ctl = make_kl_controller(ppo_cfg.adaptive_kl, ppo_cfg.init_kl_coef, ppo_cfg.kl_target,
                                         ppo_cfg.kl_horizon)
        updates_per_iteration = ppo_cfg.ppo_epochs * ppo_cfg.num_minibatches
        self.total_updates = iterations * updates_per_iteration
        self.tx, init_optimizer = make_optimizer(optim, iterations, updates_per_iteration)

        self.models, trainable, frozen, self.dropout = build_models(policy, lora, shared_backbone, value_head)
        if ppo_cfg.score_temperature is not None:
            temperature = float(ppo_cfg.score_temperature)
        else:
            temperature = 1.0 if sampling.greedy else float(sampling.temperature)
        self.spec = StepSpec(self.models, ppo_cfg, temperature, self.tx, self.mesh)
        self.frozen = shd.put(frozen, shd.param_shardings(frozen, self.mesh))
        state = TrainState(trainable, init_optimizer(trainable), self.kl_ctl.init(), jax.random.PRNGKey(seed),
                           jnp.int32(0))
        self.state_shardings = self.spec.state_shardings(state)
        self.state = shd.put(state, self.state_shardings)
        self.batch_sharding = shd.batch_sharding(self.mesh)

    # ---- one iteration ---------------------------------------------------------------------------------------------
    def batch_prompts(self, iteration: int) -> list[int]:
        """Prompt indices of an iteration: a fresh seeded permutation per pass over the data (resumable)."""
        b, n = self.cfg.batch_size, len(self.prompts)
        out: list[int] = []
        position = iteration * b
        while len(out) < b:
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            take = order[offset: offset + b - len(out)]
            out.extend(int(i) for i in take)
            position += len(take)
        return out

    def policy_model(self) -> LlamaForCausalLM:
        """The current policy as a module (views of the trainer's arrays, no copy), as rollouts run it."""
        return self.models.policy(self.state.params, self.frozen, self.dropout)

    def step(self) -> dict[str, float]:
        """One PPO iteration; returns its metrics."""
        state = self.state
        iteration = int(state.iteration)
        indices = self.batch_prompts(iteration)
        originals = [self.prompts[i] for i in indices]
        ids, mask = self.tokenizer.pad_left([self.prompt_rows[i] for i in indices], self.prompt_length)
        ids, mask = shd.put((ids, mask), (self.batch_sharding, self.batch_sharding))
        rng, gen_rng, update_rng = jax.random.split(state.rng, 3)

        t0 = time.perf_counter()
        gen = generate(self.policy_model(), ids, mask, gen_rng, self.sampling, eos_ids=self.eos_ids,
                       pad_id=self.pad_id)
        tokens, keep = shd.to_host(gen.tokens), shd.to_host(gen.mask)
        steps, drafted, accepted = (int(shd.to_host(a).sum()) for a in (gen.steps, gen.drafted, gen.accepted))
        t_rollout = time.perf_counter() - t0
        rewritten = [response_text(self.tokenizer, tokens[j], keep[j]) for j in range(len(indices))]

        t0 = time.perf_counter()
        scores, components = reward_arrays(self.reward_fn(rewritten, originals), len(indices))
        t_reward = time.perf_counter() - t0

        t0 = time.perf_counter()
        scores_dev = shd.put(jnp.asarray(scores, jnp.float32), self.batch_sharding)
        response_mask = gen.mask if self.cfg.eos_in_response else drop_final_eos(gen.tokens, gen.mask, self.eos_ids)
        rollout, stats = score_rollout(self.spec, state.params, self.frozen, ids, mask, gen.tokens, response_mask,
                                       scores_dev, state.kl_coef, self.dropout, jax.random.fold_in(update_rng, 7))
        new_state, update_metrics = ppo_update(self.spec, state, self.frozen, rollout, update_rng, self.dropout)
        kl_coef = self.kl_ctl.update(new_state.kl_coef, stats["objective/kl"], self.cfg.batch_size)
        self.state = new_state._replace(kl_coef=kl_coef, rng=rng, iteration=new_state.iteration + 1)
        metrics = {k: float(v) for k, v in {**stats, **update_metrics}.items()}
        t_update = time.perf_counter() - t0

        n_tokens = int(keep.sum())
        per_iteration = self.cfg.ppo_epochs * self.cfg.num_minibatches
        metrics.update({  # the rate of this iteration's last update
            "ppo/learning_rate": scheduled_learning_rate(self.optim_cfg, self.iterations, per_iteration,
                                                         (iteration + 1) * per_iteration - 1),
            "iteration": iteration + 1,
            "reward/mean": float(np.mean(scores)), "reward/std": float(np.std(scores)),
            **{f"reward/{k}_mean": float(np.mean(v)) for k, v in components.items()},
            "response/length_mean": n_tokens / len(indices),
            # prompt-lookup speculative decoding (sampling.prompt_lookup_tokens): drafts accepted, tokens per step
            "rollout/draft_acceptance": accepted / max(drafted, 1), "rollout/tokens_per_step": n_tokens / max(steps, 1),
            "time/rollout_s": t_rollout, "time/reward_s": t_reward, "time/update_s": t_update,
            "time/rollout_tokens_per_s": n_tokens / max(t_rollout, 1e-9),
            "time/tokens_per_s": n_tokens / max(t_rollout + t_reward + t_update, 1e-9),
        })
        self.last_texts = list(zip(originals, rewritten))
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------------------------
    def save(self, run_dir: str | Path, extra: dict | None = None, keep: int | None = None) -> None:
        """Checkpoint the whole train state (params, optimizer, KL coefficient, RNG, iteration) as step = iteration."""
        step = int(self.state.iteration)
        checkpointing.save(run_dir, step, _checkpoint_items(self.state), {"iteration": step, **(extra or {})}, keep=keep)

    def restore(self, run_dir: str | Path) -> int | None:
        """Restore the latest checkpoint of `run_dir` onto this trainer's shardings; its iteration, or None."""
        step = checkpointing.latest_step(run_dir)
        if step is None:
            return None
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                                self.state_shardings)
        items, _ = checkpointing.restore(run_dir, step, _checkpoint_items(abstract))
        self.state = shd.put(TrainState(items["params"], items["opt_state"], **items["scalars"]), self.state_shardings)
        return step


def _checkpoint_items(state: TrainState) -> dict:
    return {"params": state.params, "opt_state": state.opt_state,
            "scalars": {"kl_coef": state.kl_coef, "rng": state.rng, "iteration": state.iteration}}


def reward_arrays(out, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(scores [B], components) from a reward function's return value: an array, or an object with `.reward`."""
    components: dict[str, np.ndarray] = {}
    if hasattr(out, "reward"):
        fields = out._asdict() if hasattr(out, "_asdict") else (
            dataclasses.asdict(out) if dataclasses.is_dataclass(out) else vars(out))
        for name, value in fields.items():
            if name == "reward":
                continue
            arr = np.asarray(value) if isinstance(value, (np.ndarray, jax.Array, list, tuple)) else None
            if arr is not None and arr.shape == (batch,) and np.issubdtype(arr.dtype, np.number):
                components[name] = arr.astype(np.float64)
        out = out.reward
    scores = np.asarray(out, np.float32)
    if scores.shape != (batch,):
        raise PosiError(f"the reward function returned shape {scores.shape} for {batch} prompts; expected ({batch},)")
    if not np.all(np.isfinite(scores)):
        raise PosiError(f"the reward function returned non-finite scores: {scores.tolist()}")
    return scores, components


def run(trainer: PPOTrainer, output_dir: str | Path, *, save_every: int = 10, resume: bool = False,
        extra: dict | None = None, keep: int | None = 3, progress: bool = True, log_texts: int = 2) -> list[dict]:
    """Train until `trainer.iterations`, appending metrics to output_dir/metrics.jsonl; checkpoints under
    output_dir/checkpoints (training.checkpointing layout). With `resume`, continue from the latest checkpoint exactly (state,
    RNG, data order: the prompts of iteration i are a function of the seed and i)."""
    if save_every < 1:
        raise PosiError(f"save_every must be ≥ 1, got {save_every}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    if resume:
        restored = trainer.restore(output_dir)
        if restored is None:
            raise PosiError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}")
        start = restored
        if hasattr(trainer.reward_fn, "call_index"):
            # PosiReward's per_call noise is keyed by its call count: one call per iteration, so continue from there.
            trainer.reward_fn.call_index = start
    metrics_log = MetricsWriter(output_dir, "iteration", resume_step=start if resume else None,
                                enabled=distributed.is_main_process())  # rows after the checkpoint are dropped (redone)
    history = []
    bar = None
    if progress and distributed.is_main_process():
        from tqdm import tqdm

        bar = tqdm(total=trainer.iterations, initial=start, unit="it", desc="ppo")
    for iteration in range(start, trainer.iterations):
        metrics = trainer.step()
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:  # checked before anything of this iteration is logged or saved
            metrics_log.close()
            if bar is not None:
                bar.close()
            last = checkpointing.latest_step(output_dir)
            kept = (f"the last good checkpoint, iteration {last}, is kept in {output_dir / 'checkpoints'}"
                    if last is not None else "no checkpoint was saved")
            raise PosiError(f"iteration {iteration + 1}: non-finite {', '.join(bad[:4])}; stopped without saving it; "
                            f"{kept}. Lower optim.learning_rate or check the reward")
        history.append(metrics)
        record = dict(metrics)
        if log_texts:
            record["samples"] = [{"original": o, "rewritten": r} for o, r in trainer.last_texts[:log_texts]]
        metrics_log.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        done = iteration + 1
        if done % save_every == 0 or done == trainer.iterations:
            trainer.save(output_dir, extra, keep=keep)
    if bar is not None:
        bar.close()
    metrics_log.close()
    return history

