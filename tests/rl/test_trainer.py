"""The PPO trainer: model wiring (reference = base without adapter, value from the SFT weights), learning on a synthetic
reward, lr = 0 keeps every parameter, exact resume after a crash, the optimizer schedule, bad inputs."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.llama import LlamaForCausalLM, ValueHead
from posi_jax.nn.lora import LoRAParam, add_lora
from posi_jax.policy.sampler import SamplingConfig
from posi_jax.rl.config import LoRASettings, OptimSettings, PPOSettings
from posi_jax.rl.models import build_models
from posi_jax.rl.steps import lr_schedule
from posi_jax.rl.trainer import PPOTrainer, reward_arrays, run
from tests.rl import ppo_setup

# One setting shared by the learning, lr = 0 and resume tests, so they share one compilation of each jitted step.
PPO = PPOSettings(batch_size=16, mini_batch_size=8, gradient_accumulation_steps=2, ppo_epochs=4)
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)
FULL = LoRASettings(enabled=False)


def make_trainer(lr: float, iterations: int, reward_fn=ppo_setup.count_reward) -> PPOTrainer:
    return PPOTrainer(ppo_setup.tiny_policy(0), ppo_setup.tiny_tokenizer(), reward_fn=reward_fn,
                      prompts=ppo_setup.prompts(), ppo_cfg=PPO, optim=OptimSettings(learning_rate=lr),
                      sampling=SAMPLING, lora=FULL, iterations=iterations, seed=0)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------------------------------------
# Model wiring


@nnx.jit
def _logits(model, tokens, mask):
    return model(tokens, attention_mask=mask)[0]


@nnx.jit
def _hidden(model, tokens, mask):
    return model.hidden_states(tokens, attention_mask=mask)[0]


def _tokens():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.integers(2, len(ppo_setup.WORDS), (2, 7)), jnp.int32), jnp.ones((2, 7), bool)


def test_lora_reference_is_the_sft_policy_without_a_second_copy():
    """An SFT adapter is merged into the frozen base; PPO trains a fresh adapter; the reference is that base run
    without the PPO adapter = the SFT policy, on the very same arrays."""
    policy = ppo_setup.tiny_policy(0)
    add_lora(policy, rank=2, alpha=4.0, dropout=0.1, seed=3)
    for _, var in nnx.iter_graph(policy):  # a trained (non-zero) SFT adapter
        if isinstance(var, LoRAParam) and var.shape[0] == 2:
            var[...] = 0.3 * jax.random.normal(jax.random.key(5), var.shape)
    tokens, mask = _tokens()
    policy.eval()
    want_sft = _logits(policy, tokens, mask)
    pre_sft = _logits(ppo_setup.tiny_policy(0), tokens, mask)  # the base before SFT
    assert float(jnp.max(jnp.abs(want_sft - pre_sft))) > 1e-2  # the SFT adapter matters
    models, trainable, frozen, _ = build_models(policy, LoRASettings(rank=4, alpha=8.0), shared_backbone=False)

    forward = jax.jit(models.forward, static_argnums=(4, 5))
    logits, values = forward(trainable, frozen, tokens, mask, 0, 7)
    ref_logits = jax.jit(models.reference_logits, static_argnums=(3, 4))(frozen, tokens, mask, 0, 7)
    assert float(jnp.max(jnp.abs(logits - want_sft))) <= 1e-5  # the policy starts as the SFT model
    assert float(jnp.max(jnp.abs(ref_logits - want_sft))) <= 1e-5  # and so does the reference
    adapters = [x for x in jax.tree.leaves(trainable["policy"])]
    assert {x.shape[-1] for x in adapters if x.shape[0] == 4} and all(x.dtype == jnp.float32 for x in adapters)
    # Moving the PPO adapter moves the policy, not the reference.
    for var in jax.tree.leaves(trainable["policy"], is_leaf=lambda v: isinstance(v, LoRAParam)):
        var[...] = var[...] + 0.3
    moved = forward(trainable, frozen, tokens, mask, 0, 7)[0]
    assert float(jnp.max(jnp.abs(moved - want_sft))) > 1e-2
    # No second copy: the reference runs on the very arrays of the frozen tree; trainables are only adapters + head.
    ref_arrays = {id(x) for x in jax.tree.leaves(nnx.state(models.reference(frozen)))}
    assert ref_arrays == {id(x) for x in jax.tree.leaves(frozen)}
    base_size = sum(x.size for x in jax.tree.leaves(frozen))
    assert sum(x.size for x in jax.tree.leaves(trainable)) < 0.1 * base_size
    # The value model starts from the SFT policy (its own copy of the adapter, the shared base) with a zero head.
    assert np.all(np.asarray(values) == 0)
    head = trainable["value"]["value_head"]["summary"]["kernel"]
    head[...] = jax.random.normal(jax.random.key(2), head.shape)
    _, values = forward(trainable, frozen, tokens, mask, 0, 7)
    hidden = _hidden(models.reference(frozen), tokens, mask)  # value adapter is still B = 0: SFT hidden states
    want_values = hidden.astype(jnp.float32) @ head[...][:, 0]
    assert float(jnp.max(jnp.abs(values - want_values))) <= 1e-4


def test_full_and_shared_backbone_wiring():
    policy = ppo_setup.tiny_policy(0)
    tokens, mask = _tokens()
    hidden = _hidden(policy, tokens, mask)
    want = _logits(policy, tokens, mask)
    models, trainable, frozen, _ = build_models(policy, FULL, shared_backbone=True)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.iter_graph(models.policy(trainable, frozen)))
    # Full fine-tuning: the reference is a frozen copy, not the trained arrays.
    assert not {id(x) for x in jax.tree.leaves(trainable["policy"])} & {id(x) for x in jax.tree.leaves(frozen)}
    head = trainable["value"]["summary"]["kernel"]  # shared backbone: only a head is added
    head[...] = jax.random.normal(jax.random.key(2), head.shape)
    logits, values = jax.jit(models.forward, static_argnums=(4, 5))(trainable, frozen, tokens, mask, 2, 6)
    assert float(jnp.max(jnp.abs(logits - want[:, 2:6]))) <= 1e-5
    want_values = (hidden.astype(jnp.float32) @ head[...][:, 0])[:, 2:6]
    assert float(jnp.max(jnp.abs(values - want_values))) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def learning_history():
    trainer = make_trainer(lr=1e-2, iterations=40)
    return [trainer.step() for _ in range(trainer.iterations)]


def test_learning_on_synthetic_reward(learning_history):
    """+1 per 'x' in the response: a random policy (p('x') ~ 1/29 per token) learns to say 'x' within 40 iterations."""
    reward = np.array([m["reward/mean"] for m in learning_history])
    kl = np.array([m["objective/kl"] for m in learning_history])
    first, last = reward[:5].mean(), reward[-5:].mean()
    print(f"\nmean reward first 5 iterations {first:.3f}, last 5 {last:.3f}; KL (summed per response) last 5 "
          f"{kl[-5:].mean():.2f}, max {kl.max():.2f}; kl_coef {learning_history[-1]['objective/kl_coef']:.4f}")
    assert last > first + 3.0 and last > 4 * first
    # Bounded KL: a policy with KL > R_max / beta would score below the reference on the KL-penalised objective
    # (R_max = max_new_tokens rewards of 1, beta ~ 0.2).
    assert np.all(np.isfinite(kl)) and kl.max() < SAMPLING.max_new_tokens / 0.19
    assert learning_history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    for key in ("ppo/clipfrac", "ppo/vf_loss", "ppo/explained_variance", "objective/entropy", "ppo/approx_kl",
                "time/tokens_per_s", "ppo/grad_norm"):
        assert all(np.isfinite(m[key]) for m in learning_history), key
    assert learning_history[-1]["objective/entropy"] < learning_history[0]["objective/entropy"]


def test_zero_learning_rate_moves_nothing():
    trainer = make_trainer(lr=0.0, iterations=3)
    before = leaves(trainer.state.params)
    metrics = [trainer.step() for _ in range(3)]
    after = leaves(trainer.state.params)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert all(m["ppo/grad_norm"] > 0 for m in metrics)  # there were gradients; they were scaled by 0
    assert all(m["ppo/clipfrac"] == 0 and m["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6) for m in metrics)


class Crash(RuntimeError):
    pass


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    iterations = 4
    full = make_trainer(lr=1e-2, iterations=iterations)
    run(full, tmp_path / "full", save_every=2, progress=False)

    calls = {"n": 0}

    def crashing_reward(rewritten, original):
        calls["n"] += 1
        if calls["n"] == 4:  # dies in iteration 4, after the checkpoint of iteration 2
            raise Crash("killed")
        return ppo_setup.count_reward(rewritten, original)

    with pytest.raises(Crash):
        run(make_trainer(lr=1e-2, iterations=iterations, reward_fn=crashing_reward), tmp_path / "resumed",
            save_every=2, progress=False)
    resumed = make_trainer(lr=1e-2, iterations=iterations)
    run(resumed, tmp_path / "resumed", save_every=2, resume=True, progress=False)

    assert int(resumed.state.iteration) == iterations
    for a, b in zip(leaves(full.state), leaves(resumed.state)):
        assert np.array_equal(a, b)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3, 4]
    for got, exp in zip(lines, want):
        assert got["reward/mean"] == exp["reward/mean"] and got["ppo/loss"] == exp["ppo/loss"]
        assert got["samples"] == exp["samples"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """A reward that blows up (3e38, finite) in iteration 2 makes the value loss overflow: the run stops with one error
    naming the iteration, before that iteration is logged or checkpointed; iteration 1 stays the latest checkpoint."""
    from posi_jax.training import checkpointing

    calls = {"n": 0}

    def exploding_reward(rewritten, original):
        calls["n"] += 1
        return ppo_setup.count_reward(rewritten, original) + (3e38 if calls["n"] == 2 else 0.0)

    trainer = make_trainer(lr=1e-2, iterations=3, reward_fn=exploding_reward)
    with pytest.raises(PosiError, match=r"iteration 2: non-finite .*; stopped without saving it; the last good "
                                        r"checkpoint, iteration 1, is kept"):
        run(trainer, tmp_path, save_every=1, progress=False)
    assert checkpointing.all_steps(tmp_path) == [1]
    rows = [json.loads(line, parse_constant=pytest.fail) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1]


def test_lr_schedule_matches_optax():
    for warmup in (0, 3):
        ref = optax.warmup_cosine_decay_schedule(0.0, 2e-5, warmup, 20, end_value=0.0) if warmup \
            else optax.cosine_decay_schedule(2e-5, 20)
        got = [float(lr_schedule(c, 2e-5, 20.0, float(warmup), True)) for c in range(25)]
        np.testing.assert_allclose(got, [float(ref(c)) for c in range(25)], rtol=1e-5, atol=1e-12)
    assert float(lr_schedule(7, 2e-5, 20.0, 0.0, False)) == pytest.approx(2e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_reward_arrays():
    class Out:
        def __init__(self):
            self.reward = np.array([1.0, 2.0])
            self.q16 = np.array([0.1, 0.2])
            self.images = np.zeros((2, 4, 4, 3))

    scores, components = reward_arrays(Out(), 2)
    assert scores.tolist() == [1.0, 2.0] and list(components) == ["q16"]
    with pytest.raises(PosiError, match="shape"):
        reward_arrays(np.zeros(3), 2)
    with pytest.raises(PosiError, match="non-finite"):
        reward_arrays(np.array([1.0, np.nan]), 2)


def test_bad_settings():
    with pytest.raises(PosiError, match="mini_batch_size"):
        PPOSettings(batch_size=10, mini_batch_size=4)
    with pytest.raises(PosiError, match="gradient_accumulation_steps"):
        PPOSettings(batch_size=8, mini_batch_size=4, gradient_accumulation_steps=3)
    with pytest.raises(PosiError, match="kl_penalty"):
        PPOSettings(kl_penalty="kl2")
    with pytest.raises(PosiError, match="context"):
        PPOTrainer(ppo_setup.tiny_policy(0, max_position_embeddings=16), ppo_setup.tiny_tokenizer(),
                   reward_fn=ppo_setup.count_reward, prompts=ppo_setup.prompts(), ppo_cfg=PPO, sampling=SAMPLING)
    with pytest.raises(PosiError, match="at least one prompt"):
        PPOTrainer(ppo_setup.tiny_policy(0), ppo_setup.tiny_tokenizer(), reward_fn=ppo_setup.count_reward,
                   prompts=[], ppo_cfg=PPO, sampling=SAMPLING)
