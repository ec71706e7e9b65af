"""Upstream facts 5, 6, 8 and 9 on one PPO step: our jitted scoring and micro-batch loss against a numpy reference of
TRL 0.7's `PPOTrainer.step` as LLaMA-Factory (upstream POSI) drives it, written from that behaviour, on the same logits.

The reference lays a rollout out as upstream does: `get_inputs` cuts each generated response after its last non-pad
token (pad = EOS, so the EOS goes; an all-EOS response keeps one token), query + response right-padded; its
`batched_forward_pass` takes log-probs of the raw logits (temperature 1) and masks all but the response positions.
Then TRL: rewards = -kl_coef * (logprob - ref_logprob), plus the score on the last masked position; GAE over the whole
row (gamma, lam) with values and rewards zeroed outside the mask; returns = advantages + values; advantages whitened
over the batch (unbiased variance); the clipped losses; a mini-batch whose mean ratio exceeds ratio_threshold gets its
losses multiplied by 0. Our side runs the left-padded layout through `score_rollout` and `ppo_minibatch_loss`; the
reference's logits and values come from the same model on its own right-padded layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.nn import sharding as shd
from posi_jax.rl.config import LoRASettings, OptimSettings, PPOSettings, ValueHeadSettings
from posi_jax.rl.models import build_models
from posi_jax.rl.ppo import drop_final_eos
from posi_jax.rl.steps import StepSpec, make_optimizer, ppo_minibatch_loss, score_rollout
from tests.rl import ppo_setup

EOS = 1  # ppo_setup's tokenizer: <eos> = 1 (upstream: pad = EOS)
KL_COEF, GAMMA, LAM, CLIP, CLIP_V, VF_COEF, THRESHOLD = 0.2, 1.0, 0.95, 0.2, 0.2, 0.1, 10.0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
# Generated rows as HF generate returns them (after EOS: pad = EOS): content then EOS; no EOS (max length reached);
# EOS at once (an empty response); two tokens then EOS.
GENERATED = [[20, 21, 22, 23, EOS, EOS], [24, 25, 26, 27, 28, 19], [EOS, EOS, EOS, EOS, EOS, EOS],
             [3, 4, EOS, EOS, EOS, EOS]]
SCORES = np.array([1.5, -0.7, 0.3, 2.2], np.float32)


# ---- the numpy reference (TRL 0.7 + LLaMA-Factory), float64 -------------------------------------------------------
def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def masked_mean(x, m):
    return (x * m).sum() / m.sum()


def masked_var(x, m):
    centered = x - masked_mean(x, m)
    return masked_mean(centered ** 2, m) * (m.sum() / (m.sum() - 1))


def masked_whiten(x, m):
    return (x - masked_mean(x, m)) / np.sqrt(masked_var(x, m) + 1e-8)


def upstream_inputs():
    """get_inputs: response = generated row up to its last non-pad token (at least one token); right padding."""
    responses = []
    for row in GENERATED:
        content = [i for i, t in enumerate(row) if t != EOS]
        responses.append(row[: content[-1] + 1] if content else row[:1])
    rows = [q + r for q, r in zip(PROMPTS, responses)]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), EOS, np.int64)
    attention = np.zeros((len(rows), length), np.int64)
    for j, r in enumerate(rows):
        ids[j, :len(r)], attention[j, :len(r)] = r, 1
    return responses, ids, attention


def upstream_forward(logits, values, ids, attention, responses):
    """batched_forward_pass: log-probs of the raw logits at positions :-1 and the response mask."""
    logprobs = np.take_along_axis(log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    masks = np.zeros_like(attention)
    masks[:, :-1] = attention[:, 1:]
    for j, (q, r) in enumerate(zip(PROMPTS, responses)):
        start = len(q) - 1
        masks[j, :start] = 0
        masks[j, start + len(r):] = 0
    return logprobs, values[:, :-1], masks[:, :-1].astype(np.float64)


def upstream_rewards_advantages(scores, logprobs, ref_logprobs, values, masks):
    kl = logprobs - ref_logprobs
    rewards = -KL_COEF * kl
    for j in range(len(scores)):
        rewards[j, np.nonzero(masks[j])[0][-1]] += scores[j]
    values, rewards = values * masks, rewards * masks
    lastgaelam, reversed_adv = 0.0, []
    length = rewards.shape[-1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
        lastgaelam = delta + GAMMA * LAM * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = np.stack(reversed_adv[::-1], axis=1)
    returns = advantages + values
    return rewards, masked_whiten(advantages, masks), returns, values, (kl * masks).sum(-1).mean()


def upstream_loss(old_logprobs, values, logprobs, vpreds, masks, advantages, returns):
    vpredclipped = np.clip(vpreds, values - CLIP_V, values + CLIP_V)
    vf_loss = 0.5 * masked_mean(np.maximum((vpreds - returns) ** 2, (vpredclipped - returns) ** 2), masks)
    ratio = np.exp(logprobs - old_logprobs)
    pg_losses, pg_losses2 = -advantages * ratio, -advantages * np.clip(ratio, 1.0 - CLIP, 1.0 + CLIP)
    pg_loss = masked_mean(np.maximum(pg_losses, pg_losses2), masks)
    clipfrac = masked_mean((pg_losses2 > pg_losses).astype(np.float64), masks)
    loss = pg_loss + VF_COEF * vf_loss
    skipped = masked_mean(ratio, masks) > THRESHOLD
    if skipped:
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
    return dict(loss=loss, pg_loss=pg_loss, vf_loss=vf_loss, clipfrac=clipfrac,
                ratio_mean=masked_mean(ratio, masks), skipped=float(skipped))


# ---- our side -----------------------------------------------------------------------------------------------------
def _with_lora_b(params, fn):
    """`params` with each policy LoRA B matrix (rank 4 rows) replaced by fn(index, B)."""
    leaves, treedef = jax.tree.flatten(params["policy"])
    leaves = [fn(i, x) if x.shape[0] == 4 else x for i, x in enumerate(leaves)]
    return {**params, "policy": jax.tree.unflatten(treedef, leaves)}


@pytest.fixture(scope="module")
def setup():
    models, trainable, frozen, dropout = build_models(
        ppo_setup.tiny_policy(0), LoRASettings(rank=4, alpha=8.0), shared_backbone=True,
        value_head=ValueHeadSettings(init="torch_default", seed=3))
    cfg = PPOSettings(batch_size=4, mini_batch_size=4, gradient_accumulation_steps=1, score_temperature=1.0,
                      eos_in_response=False, init_kl_coef=KL_COEF, gamma=GAMMA, lam=LAM, cliprange=CLIP,
                      cliprange_value=CLIP_V, vf_coef=VF_COEF, ratio_threshold=THRESHOLD)
    tx, _ = make_optimizer(OptimSettings(), 1, 1)
    spec = StepSpec(models, cfg, 1.0, tx, shd.make_mesh(devices=jax.devices()[:1]))
    # old: a trained PPO adapter (the policy is not its reference); new: a step further (ratio != 1)
    old = _with_lora_b(trainable, lambda i, b: 0.5 * jax.random.normal(jax.random.key(10 + i), b.shape))
    new = _with_lora_b(old, lambda i, b: b + 0.3 * jax.random.normal(jax.random.key(99 + i), b.shape))
    return models, spec, old, new, frozen


def reference_logits_values(models, params, frozen, ids, attention):
    forward = jax.jit(models.forward, static_argnums=(4, 5))
    logits, values = forward(params, frozen, jnp.asarray(ids, jnp.int32), jnp.asarray(attention, bool), 0,
                             ids.shape[1])
    ref = jax.jit(models.reference_logits, static_argnums=(3, 4))(frozen, jnp.asarray(ids, jnp.int32),
                                                                  jnp.asarray(attention, bool), 0, ids.shape[1])
    return (np.asarray(x, np.float64) for x in (logits, values, ref))


def test_one_ppo_step_equals_trl_0_7(setup):
    models, spec, old, new, frozen = setup
    # ours: left-padded prompts, generated rows with pad (0) after the first EOS, upstream's response mask
    prompt_ids, prompt_mask = ppo_setup.tiny_tokenizer().pad_left(PROMPTS)
    generated = np.array(GENERATED, np.int32)
    gen_mask = np.zeros_like(generated, bool)
    for j, row in enumerate(GENERATED):
        stop = row.index(EOS) + 1 if EOS in row else len(row)
        gen_mask[j, :stop] = True
    tokens = np.where(gen_mask, generated, 0)
    response_mask = drop_final_eos(jnp.asarray(tokens), jnp.asarray(gen_mask), (EOS,))
    rollout, stats = score_rollout(spec, old, frozen, prompt_ids, prompt_mask, tokens, response_mask,
                                   jnp.asarray(SCORES), jnp.float32(KL_COEF))

    # the reference, on its own layout
    responses, ids, attention = upstream_inputs()
    logits, values, ref_logits = reference_logits_values(models, old, frozen, ids, attention)
    logprobs, values, masks = upstream_forward(logits, values, ids, attention, responses)
    ref_logprobs = np.take_along_axis(log_softmax(ref_logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    rewards, advantages, returns, values, kl = upstream_rewards_advantages(SCORES.astype(np.float64), logprobs,
                                                                         ref_logprobs, values, masks)

    # align: the reference's masked positions are our kept response slots, in order
    ours_mask = np.asarray(rollout.response_mask)
    assert ours_mask.sum(1).tolist() == [4, 6, 1, 2] == masks.sum(1).tolist()  # EOS out; empty response keeps 1
    def ours(x):
        return np.concatenate([np.asarray(x)[j][ours_mask[j]] for j in range(4)])

    def theirs(x):
        return np.concatenate([x[j][masks[j] > 0] for j in range(4)])

    errors = {name: float(np.max(np.abs(ours(a) - theirs(b)))) for name, a, b in (
        ("logprobs", rollout.logprobs, logprobs), ("values", rollout.values, values),
        ("rewards", rollout.rewards, rewards), ("advantages", rollout.advantages, advantages),
        ("returns", rollout.returns, returns))}
    errors["objective/kl"] = abs(float(stats["objective/kl"]) - kl)
    print("one PPO step vs numpy TRL 0.7:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= 2e-5, errors
    assert abs(kl) > 1e-2 and np.ptp(theirs(values)) > 1e-2  # a real KL and a real (torch-init) value head
    last = [np.nonzero(masks[j])[0][-1] for j in range(4)]  # the score sits on the last content token
    np.testing.assert_allclose([rewards[j, t] for j, t in enumerate(last)],
                               [SCORES[j] - KL_COEF * (logprobs[j, t] - ref_logprobs[j, t]) for j, t in enumerate(last)])

    # the micro-batch loss with updated parameters (ratio != 1), then with the ratio pushed over the threshold
    new_logits, new_values, _ = reference_logits_values(models, new, frozen, ids, attention)
    new_logprobs, vpreds, _ = upstream_forward(new_logits, new_values, ids, attention, responses)
    loss_fn = jax.jit(ppo_minibatch_loss, static_argnums=0)
    # old log-probs lowered by a random ±0.5 per token (ratios on both sides of the clip range), then by 3 (mean
    # ratio ~ 20 > 10: TRL skips the batch)
    jitter = np.random.default_rng(0).uniform(-0.5, 0.5, masks.shape) * masks
    for name, shift in (("jitter", jitter), ("+3", 3.0 * masks)):
        shift_ours = np.zeros(ours_mask.shape, np.float32)
        for j in range(4):
            shift_ours[j, ours_mask[j]] = shift[j][masks[j] > 0]
        mb = rollout._replace(logprobs=rollout.logprobs - shift_ours)
        loss, metrics = loss_fn(spec, new, frozen, mb)
        want = upstream_loss(logprobs - shift, values, new_logprobs, vpreds, masks, advantages, returns)
        got = {k: float(metrics[k]) for k in want}
        print(f"loss, old log-probs shifted ({name}): ours {got}, TRL {want}")
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=2e-5, rel=1e-4), k
        assert float(loss) == pytest.approx(want["loss"], abs=2e-5)
        grads = jax.grad(lambda p: loss_fn(spec, p, frozen, mb)[0])(new)
        grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
        if want["skipped"]:
            assert grad_norm == 0.0 and want["loss"] == 0.0
        else:
            assert grad_norm > 1e-4 and abs(want["loss"]) > 1e-4 and 0.0 < want["clipfrac"] < 1.0


def test_schedule_steps_once_per_iteration():
    """Fact 9: TRL steps transformers' cosine once per PPO step, so every optimizer update of iteration k uses
    lr0 * (1 + cos(pi * k / schedule_steps)) / 2. With constant unit gradients (no weight decay) an Adam update is
    -lr to within eps, which shows the rate each update used."""
    lr0, per_iteration = 1.9e-5, 4  # TRL 0.7 as upstream runs it: one update per epoch, 4 epochs
    settings = PPOSettings(batch_size=16, mini_batch_size=16, gradient_accumulation_steps=4, ppo_epochs=4)
    assert settings.num_minibatches * settings.ppo_epochs == per_iteration
    # a short cosine (6 iterations) so neighbouring iterations' rates differ by far more than fp32 Adam's rounding
    tx, init = make_optimizer(OptimSettings(learning_rate=lr0, weight_decay=0.0, schedule_steps=6), 5, per_iteration)
    params = {"w": jnp.zeros(3)}
    state = init(params)
    used = []
    for _ in range(3 * per_iteration):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        used.append(-float(updates["w"][0]))
    want = [lr0 * 0.5 * (1 + np.cos(np.pi * (u // per_iteration) / 6)) for u in range(3 * per_iteration)]
    np.testing.assert_allclose(used, want, rtol=1e-4)
    tx_update, init_update = make_optimizer(OptimSettings(learning_rate=lr0, weight_decay=0.0, schedule_unit="update"),
                                            52, per_iteration)
    state = init_update(params)
    for _ in range(2):
        updates, state = tx_update.update({"w": jnp.ones(3)}, state, params)
    assert -float(updates["w"][0]) == pytest.approx(lr0 * 0.5 * (1 + np.cos(np.pi / (52 * per_iteration))), rel=1e-4)


def test_dropout_scores_and_updates_but_never_samples():
    """Fact 9 (LoRA dropout 0.1 stays on in PPO) and fact 8 (value-head dropout 0.1, torch's Linear init): with a key
    the forward pass drops, each key its own mask; without one (rollouts) it does not; with the defaults (0) a key
    changes nothing."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(2, 29, (2, 7)), jnp.int32)
    mask = jnp.ones((2, 7), bool)
    out = {}
    for name, lora, head in (("upstream", LoRASettings(rank=4, alpha=8.0, dropout=0.1),
                              ValueHeadSettings(init="torch_default", dropout=0.1)),
                             ("ours", LoRASettings(rank=4, alpha=8.0), ValueHeadSettings())):
        models, trainable, frozen, dropout = build_models(ppo_setup.tiny_policy(0), lora, True, head)
        trainable = _with_lora_b(trainable, lambda i, b: 0.5 * jax.random.normal(jax.random.key(i), b.shape))
        forward = jax.jit(models.forward, static_argnums=(4, 5))
        out[name] = [forward(trainable, frozen, tokens, mask, 0, 7, dropout, key)
                     for key in (None, jax.random.key(1), jax.random.key(1), jax.random.key(2))]
        kernel = np.asarray(trainable["value"]["summary"]["kernel"][...])
        if head.init == "torch_default":  # uniform in ±1/sqrt(hidden)
            assert 0.5 / np.sqrt(32) < np.abs(kernel).max() <= 1 / np.sqrt(32)
        else:
            assert not kernel.any()
        sampled = models.policy(trainable, frozen, dropout)(tokens, attention_mask=mask)[0]
        np.testing.assert_allclose(np.asarray(sampled), np.asarray(out[name][0][0]), atol=1e-5)
    plain, key1, key1_again, key2 = out["upstream"]
    for a, b in zip(key1, key1_again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same key: the same masks
    for i in (0, 1):  # logits (LoRA dropout) and values (both dropouts) change with the key
        assert np.abs(np.asarray(key1[i]) - np.asarray(plain[i])).max() > 1e-3
        assert np.abs(np.asarray(key1[i]) - np.asarray(key2[i])).max() > 1e-3
    for got in out["ours"][1:]:
        for a, b in zip(got, out["ours"][0]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
