"""posi_jax.rl.ppo against plain numpy loops (float64) on hand-made batches with padding, holes and short rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.errors import PosiError
from posi_jax.rl import ppo

# One row per masking situation the trainer can produce (T = 9).
MASK = np.array([
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # right padding, length 5
    [0, 0, 0, 0, 0, 1, 1, 1, 1],  # left padding, length 4
    [1, 1, 0, 0, 1, 1, 1, 0, 0],  # a hole in the middle, then right padding
    [1, 0, 0, 0, 0, 0, 0, 0, 0],  # length 1, right padded
    [0, 0, 0, 0, 0, 0, 0, 0, 0],  # fully masked
    [1, 1, 1, 1, 1, 1, 1, 1, 1],  # full row
    [0, 0, 1, 1, 1, 0, 0, 0, 0],  # prompt (left) and right padding
    [0, 0, 0, 0, 0, 0, 0, 0, 1],  # length 1, left padded
], dtype=bool)
B, T = MASK.shape


def rng(seed):
    return np.random.default_rng(seed)


def with_garbage(x, mask, value=1e4):
    """x with every invalid position overwritten by `value` (NaN or a huge number): outputs must not notice."""
    return np.where(mask, x, value).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# numpy references, written as plain loops in float64


def np_masked_mean(x, mask):
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                total += float(x[b, t])
                count += 1
    return total / count if count else 0.0


def np_masked_var(x, mask):
    values = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(values)
    if n == 0:
        return 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return var * n / (n - 1) if n > 1 else var


def np_whiten(x, mask, shift_mean=True):
    mean, var = np_masked_mean(x, mask), np_masked_var(x, mask)
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (x[b, t] - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out


def np_kl(lp, ref, kind):
    d = lp.astype(np.float64) - ref.astype(np.float64)
    if kind == "k1":
        return d
    if kind == "k3":
        return np.exp(-d) - 1 + d
    if kind == "abs":
        return np.abs(d)
    return 0.5 * d * d


def np_rewards(score, lp, ref, mask, kl_coef, kind):
    rewards, kl = np.zeros(lp.shape), np.zeros(lp.shape)
    for b in range(lp.shape[0]):
        last = None
        for t in range(lp.shape[1]):
            if mask[b, t]:
                kl[b, t] = np_kl(lp[b, t], ref[b, t], kind)
                rewards[b, t] = -kl_coef * kl[b, t]
                last = t
        if last is not None:
            rewards[b, last] += score[b]
    return rewards, kl


def np_gae(rewards, values, mask, gamma, lam):
    """Backward loop over the valid tokens of each row, as if they were contiguous."""
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last_gae = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_value = float(values[b, idx[j + 1]]) if j + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last_gae = delta + gamma * lam * last_gae
            adv[b, t] = last_gae
            ret[b, t] = last_gae + float(values[b, t])
    return adv, ret


def np_gae_trl(rewards, values, mask, gamma, lam):
    """TRL's loop (values and rewards multiplied by the mask, no skipping)."""
    values, rewards = values * mask, rewards * mask
    adv = np.zeros(rewards.shape)
    last_gae = np.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        adv[:, t] = last_gae
    return adv, adv + values


def np_policy_loss(new, old, adv, mask, eps):
    terms, clipped_active, log_r = np.zeros(new.shape), np.zeros(new.shape), np.zeros(new.shape)
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            log_r[b, t] = float(new[b, t]) - float(old[b, t])
            r = np.exp(log_r[b, t])
            unclipped = -adv[b, t] * r
            clipped = -adv[b, t] * min(max(r, 1 - eps), 1 + eps)
            terms[b, t] = max(unclipped, clipped)
            clipped_active[b, t] = float(clipped > unclipped)
    ratio = np.exp(log_r)
    return np_masked_mean(terms, mask), {
        "clipfrac": np_masked_mean(clipped_active, mask),
        "approx_kl": 0.5 * np_masked_mean(log_r ** 2, mask),
        "approx_kl_k3": np_masked_mean(ratio - 1 - log_r, mask),
        "policy_kl": np_masked_mean(-log_r, mask),
        "ratio_mean": np_masked_mean(ratio, mask),
    }


def np_value_loss(new, old, ret, mask, eps):
    terms, clipped_active, err = np.zeros(new.shape), np.zeros(new.shape), np.zeros(new.shape)
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            v, v_old, r = float(new[b, t]), float(old[b, t]), float(ret[b, t])
            v_clipped = min(max(v, v_old - eps), v_old + eps)
            e1, e2 = (v - r) ** 2, (v_clipped - r) ** 2
            terms[b, t], clipped_active[b, t], err[b, t] = max(e1, e2), float(e2 > e1), e1
    return 0.5 * np_masked_mean(terms, mask), {
        "vf_clipfrac": np_masked_mean(clipped_active, mask),
        "value_error": np_masked_mean(err, mask),
        "value_mean": np_masked_mean(new, mask),
    }


def np_explained_variance(values, returns, mask):
    var_returns = np_masked_var(returns, mask)
    return 1.0 - np_masked_var(returns.astype(np.float64) - values, mask) / var_returns if var_returns > 0 else 0.0


def np_log_softmax_rows(logits, temperature):
    out = np.zeros(logits.shape)
    for idx in np.ndindex(logits.shape[:-1]):
        row = logits[idx].astype(np.float64) / temperature
        m = row.max()
        out[idx] = row - (m + np.log(np.sum(np.exp(row - m))))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# log-probs and entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_token_logprobs_and_entropy_match_numpy(temperature, chunk_size):
    g = rng(0)
    logits = (g.normal(size=(3, 7, 50)) * 4).astype(np.float32)
    tokens = g.integers(0, 50, size=(3, 7))
    log_probs = np_log_softmax_rows(logits, temperature)
    want_lp = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    want_ent = -np.sum(np.exp(log_probs) * log_probs, axis=-1)
    lp = ppo.token_logprobs(logits, tokens, temperature, chunk_size=chunk_size)
    ent = ppo.entropy_from_logits(logits, temperature, chunk_size=chunk_size)
    lp2, ent2 = ppo.token_logprobs_and_entropy(logits, tokens, temperature, chunk_size=chunk_size)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32 and lp.shape == (3, 7)
    np.testing.assert_allclose(lp, want_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lp2, lp, atol=1e-6, rtol=0)  # same math, fused differently
    np.testing.assert_allclose(ent2, ent, atol=1e-6, rtol=0)


def test_entropy_with_masked_vocabulary_is_finite():
    logits = np.array([[[0.0, 1.0, -np.inf, 2.0], [-np.inf, 0.5, -np.inf, -np.inf]]], np.float32)
    finite = np.array([[[0.0, 1.0, 2.0], [0.5, 0.5, 0.5]]])
    want = [[-np.sum(np.exp(r - np.log(np.exp(r).sum())) * (r - np.log(np.exp(r).sum()))) for r in finite[0]]]
    want[0][1] = 0.0  # a single allowed token: zero entropy
    lp, ent = ppo.token_logprobs_and_entropy(logits, np.array([[3, 1]]))
    np.testing.assert_allclose(ent, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(lp, [[2.0 - np.log(np.exp(finite[0, 0]).sum()), 0.0]], atol=1e-6, rtol=0)
    grad = jax.grad(lambda l: jnp.sum(ppo.token_logprobs_and_entropy(l, np.array([[3, 1]]))[1]))(logits)
    assert np.isfinite(np.asarray(grad)).all()


def test_token_logprobs_bf16_logits_are_scored_in_fp32():
    g = rng(1)
    logits = jnp.asarray(g.normal(size=(2, 4, 300)) * 8, jnp.bfloat16)  # large logits: bf16 log-softmax would be off
    tokens = g.integers(0, 300, size=(2, 4))
    want = np.take_along_axis(np_log_softmax_rows(np.asarray(logits, np.float32), 1.0), tokens[..., None], -1)[..., 0]
    got = ppo.token_logprobs(logits, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    g = rng(2)
    logits = g.normal(size=(2, 3, 11)).astype(np.float32)
    tokens = g.integers(0, 11, size=(2, 3))
    weights = g.normal(size=(2, 3)).astype(np.float32)
    grad = jax.grad(lambda l: jnp.sum(ppo.token_logprobs(l, tokens) * weights))(logits)
    probs = np.exp(np_log_softmax_rows(logits, 1.0))
    onehot = np.zeros_like(probs)
    for b in range(2):
        for t in range(3):
            onehot[b, t, tokens[b, t]] = 1.0
    np.testing.assert_allclose(grad, (onehot - probs) * weights[..., None], atol=1e-6, rtol=0)


def test_token_logprobs_do_not_materialise_the_vocabulary_in_fp32():
    b, t, v = 4, 64, 32000
    full = b * t * v * 4
    logits = jax.ShapeDtypeStruct((b, t, v), jnp.float32)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(fn, *args, **kw):
        return fn.lower(*args, **kw).compile().memory_analysis().temp_size_in_bytes

    lp_temp = temp_bytes(ppo.token_logprobs, logits, tokens)
    chunked_temp = temp_bytes(ppo.token_logprobs_and_entropy, logits, tokens, chunk_size=16)
    print(f"temp bytes: logprobs {lp_temp}, chunked logprobs+entropy {chunked_temp}, one fp32 [B,T,V] {full}")
    assert lp_temp < full // 100
    assert chunked_temp < full // 4


def test_logits_tokens_shape_mismatch_is_a_posi_error():
    with pytest.raises(PosiError, match=r"logits \(2, 3, 5\) do not match tokens \(2, 4\)"):
        ppo.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


# ---------------------------------------------------------------------------------------------------------------------
# masked statistics


def test_masked_mean_var_whiten_match_numpy():
    g = rng(3)
    x = (g.normal(size=(B, T)) * 3 + 1.5).astype(np.float32)
    garbage = with_garbage(x, MASK, np.nan)
    np.testing.assert_allclose(ppo.masked_mean(garbage, MASK), np_masked_mean(x, MASK), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ppo.masked_var(garbage, MASK), np_masked_var(x, MASK), atol=1e-5, rtol=0)
    for shift_mean in (True, False):
        got = ppo.masked_whiten(garbage, MASK, shift_mean=shift_mean)
        np.testing.assert_allclose(got, np_whiten(x, MASK, shift_mean), atol=1e-5, rtol=0)
    whitened = np.asarray(ppo.masked_whiten(garbage, MASK))
    np.testing.assert_allclose(np_masked_mean(whitened, MASK), 0.0, atol=1e-6)
    np.testing.assert_allclose(np_masked_var(whitened, MASK), 1.0, atol=1e-5)
    # per-row means along an axis; the fully masked row gives 0, not NaN
    row_means = [np_masked_mean(x[b:b + 1], MASK[b:b + 1]) for b in range(B)]
    np.testing.assert_allclose(ppo.masked_mean(garbage, MASK, axis=1), row_means, atol=1e-6, rtol=0)
    assert np.asarray(ppo.masked_mean(garbage, MASK, axis=1))[4] == 0.0


def test_masked_statistics_degenerate_masks():
    x = np.arange(B * T, dtype=np.float32).reshape(B, T)
    empty = np.zeros_like(MASK)
    assert float(ppo.masked_mean(x, empty)) == 0.0
    assert float(ppo.masked_var(x, empty)) == 0.0
    np.testing.assert_array_equal(ppo.masked_whiten(x, empty), np.zeros((B, T)))
    single = np.zeros_like(MASK)
    single[2, 3] = True
    assert float(ppo.masked_var(x, single)) == 0.0  # one valid token: no division by n - 1 = 0
    assert np.isfinite(np.asarray(ppo.masked_whiten(x, single))).all()
    # float 0/1 masks behave like bool masks
    np.testing.assert_allclose(ppo.masked_mean(x, MASK.astype(np.float32)), np_masked_mean(x, MASK), atol=1e-5)


def test_explained_variance_matches_numpy():
    g = rng(4)
    returns = g.normal(size=(B, T)).astype(np.float32)
    values = (returns + 0.3 * g.normal(size=(B, T))).astype(np.float32)
    got = ppo.explained_variance(with_garbage(values, MASK), with_garbage(returns, MASK, np.nan), MASK)
    np.testing.assert_allclose(got, np_explained_variance(values, returns, MASK), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ppo.explained_variance(returns, returns, MASK), 1.0, atol=1e-6)
    assert float(ppo.explained_variance(values, np.ones((B, T), np.float32), MASK)) == 0.0  # constant returns


# ---------------------------------------------------------------------------------------------------------------------
# KL penalty and rewards


@pytest.mark.parametrize("kind", ["k1", "k3", "abs", "mse"])
def test_kl_penalty_matches_numpy(kind):
    g = rng(5)
    lp = g.normal(size=(B, T)).astype(np.float32) - 2
    ref = (lp + 0.5 * g.normal(size=(B, T))).astype(np.float32)
    np.testing.assert_allclose(ppo.kl_penalty(lp, ref, kind), np_kl(lp, ref, kind), atol=1e-6, rtol=1e-6)


def test_kl_penalty_unknown_kind_is_a_posi_error():
    with pytest.raises(PosiError, match="unknown kind 'full'"):
        ppo.kl_penalty(jnp.zeros((2, 3)), jnp.zeros((2, 3)), "full")


@pytest.mark.parametrize("kind", ["k1", "k3", "abs", "mse"])
def test_compute_rewards_places_score_on_last_valid_token(kind):
    g = rng(6)
    lp = g.normal(size=(B, T)).astype(np.float32) - 2
    ref = (lp + 0.5 * g.normal(size=(B, T))).astype(np.float32)
    score = (g.normal(size=(B,)) * 5).astype(np.float32)
    kl_coef = 0.37
    rewards, kl = jax.jit(ppo.compute_rewards, static_argnames="kind")(
        score, with_garbage(lp, MASK, np.nan), with_garbage(ref, MASK), MASK, kl_coef, kind=kind)
    want_rewards, want_kl = np_rewards(score, lp, ref, MASK, kl_coef, kind)
    np.testing.assert_allclose(rewards, want_rewards, atol=1e-5, rtol=0)
    np.testing.assert_allclose(kl, want_kl, atol=1e-6, rtol=1e-6)
    # explicitly: the score sits at the last valid index of each row (4, 8, 6, 0, -, 8, 4, 8), nowhere else
    score_only, _ = ppo.compute_rewards(score, lp, lp, MASK, 0.0, kind)
    expected = np.zeros((B, T), np.float32)
    for b, t in [(0, 4), (1, 8), (2, 6), (3, 0), (5, 8), (6, 4), (7, 8)]:
        expected[b, t] = score[b]
    np.testing.assert_array_equal(score_only, expected)
    assert np.isfinite(np.asarray(rewards)).all()


def test_compute_rewards_score_shape_is_checked():
    with pytest.raises(PosiError, match="score has shape"):
        ppo.compute_rewards(jnp.zeros((3,)), jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4), bool), 0.1)


# ---------------------------------------------------------------------------------------------------------------------
# GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_backward_loop(gamma, lam):
    g = rng(7)
    rewards = g.normal(size=(B, T)).astype(np.float32)
    values = g.normal(size=(B, T)).astype(np.float32)
    adv, ret = ppo.gae_advantages(with_garbage(rewards, MASK, np.nan), with_garbage(values, MASK, 1e6), MASK,
                                  gamma, lam)
    want_adv, want_ret = np_gae(rewards, values, MASK, gamma, lam)
    print(f"gae gamma={gamma} lam={lam} max abs err {np.abs(np.asarray(adv) - want_adv).max():.2e}")
    np.testing.assert_allclose(adv, want_adv, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5, rtol=0)
    assert np.all(np.asarray(adv)[~MASK] == 0) and np.all(np.asarray(ret)[~MASK] == 0)


def test_gae_equals_trl_loop_on_padding_without_holes():
    g = rng(8)
    rewards = g.normal(size=(B, T)).astype(np.float32)
    values = g.normal(size=(B, T)).astype(np.float32)
    no_hole = [b for b in range(B) if b != 2]
    adv, ret = ppo.gae_advantages(rewards, values, MASK, 1.0, 0.95)
    want_adv, want_ret = np_gae_trl(rewards.astype(np.float64), values.astype(np.float64), MASK, 1.0, 0.95)
    valid = MASK[no_hole]
    np.testing.assert_allclose(np.asarray(adv)[no_hole][valid], want_adv[no_hole][valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ret)[no_hole][valid], want_ret[no_hole][valid], atol=1e-5, rtol=0)


def test_gae_hole_is_skipped_by_the_carry():
    # One row [r0, r1, hole, r3] with gamma = lam = 1: the hole contributes nothing, A_t = sum of later rewards - V_t.
    rewards = np.array([[1.0, 2.0, 100.0, 4.0]], np.float32)
    values = np.array([[0.5, 0.25, 100.0, 0.125]], np.float32)
    mask = np.array([[1, 1, 0, 1]], bool)
    adv, ret = ppo.gae_advantages(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[7.0 - 0.5, 6.0 - 0.25, 0.0, 4.0 - 0.125]], atol=1e-6)
    np.testing.assert_allclose(ret, [[7.0, 6.0, 0.0, 4.0]], atol=1e-6)


def test_gae_is_a_scan_under_jit():
    jaxpr = str(jax.make_jaxpr(ppo.gae_advantages)(jnp.zeros((B, T)), jnp.zeros((B, T)), MASK, 1.0, 0.95))
    assert "scan" in jaxpr


# ---------------------------------------------------------------------------------------------------------------------
# losses


def policy_batch(eps=0.2):
    """log-ratios covering every clipping region with both advantage signs, plus padding with garbage."""
    g = rng(9)
    old = (g.normal(size=(B, T)) - 3).astype(np.float32)
    # ratios: well below 1 - eps, inside, well above 1 + eps (kept 0.05 away from the boundaries)
    ratios = g.choice([0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.6], size=(B, T)) * np.exp(g.uniform(-0.02, 0.02, (B, T)))
    new = (old + np.log(ratios)).astype(np.float32)
    adv = g.normal(size=(B, T)).astype(np.float32)
    adv[np.abs(adv) < 0.1] = 0.5
    return new, old, adv


def test_policy_batch_exercises_every_clipping_region():
    new, old, adv = policy_batch()
    r = np.exp(new.astype(np.float64) - old)[MASK]
    a = adv[MASK]
    for region in (r < 0.8, (r > 0.8) & (r < 1.2), r > 1.2):
        assert np.any(region & (a > 0)) and np.any(region & (a < 0))


@pytest.mark.parametrize("eps", [0.2, 0.1])
def test_policy_loss_matches_numpy(eps):
    new, old, adv = policy_batch()
    loss, metrics = ppo.policy_loss(with_garbage(new, MASK, 80.0), with_garbage(old, MASK, -80.0),
                                    with_garbage(adv, MASK, np.nan), MASK, eps)
    want_loss, want_metrics = np_policy_loss(new, old, adv, MASK, eps)
    print(f"policy loss eps={eps}: {float(loss):.6f} vs {want_loss:.6f}, clipfrac {want_metrics['clipfrac']:.3f}")
    np.testing.assert_allclose(loss, want_loss, atol=1e-6, rtol=0)
    assert 0.2 < want_metrics["clipfrac"] < 0.8
    for name, want in want_metrics.items():
        np.testing.assert_allclose(metrics[name], want, atol=1e-6, rtol=0, err_msg=name)


def test_policy_loss_gradient_zero_where_clipped_and_analytic_elsewhere():
    eps = 0.2
    new, old, adv = policy_batch()
    grad = np.asarray(jax.grad(lambda n: ppo.policy_loss(n, old, adv, MASK, eps)[0])(new))
    n_valid = MASK.sum()
    want = np.zeros((B, T))
    clipped_seen = free_seen = 0
    for b in range(B):
        for t in range(T):
            if not MASK[b, t]:
                continue
            r = np.exp(float(new[b, t]) - float(old[b, t]))
            unclipped, clipped = -adv[b, t] * r, -adv[b, t] * min(max(r, 1 - eps), 1 + eps)
            if clipped > unclipped:  # the clipped (constant) branch is active: no gradient
                clipped_seen += 1
            else:
                want[b, t] = -adv[b, t] * r / n_valid
                free_seen += 1
    assert clipped_seen > 3 and free_seen > 3
    np.testing.assert_array_equal(grad[(want == 0)], 0.0)
    np.testing.assert_allclose(grad, want, atol=1e-6, rtol=0)
    # central finite differences of the float64 numpy reference agree too
    fd = np.zeros((B, T))
    h = 1e-6
    new64 = new.astype(np.float64)
    for b, t in zip(*np.nonzero(MASK)):
        plus, minus = new64.copy(), new64.copy()
        plus[b, t] += h
        minus[b, t] -= h
        loss_plus = np_policy_loss(plus, old, adv, MASK, eps)[0]
        loss_minus = np_policy_loss(minus, old, adv, MASK, eps)[0]
        fd[b, t] = (loss_plus - loss_minus) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-6, rtol=0)
    # garbage (NaN) at padding changes neither the gradient nor its finiteness
    grad_nan = jax.grad(lambda n: ppo.policy_loss(n, old, with_garbage(adv, MASK, np.nan), MASK, eps)[0])(
        with_garbage(new, MASK, np.nan))
    np.testing.assert_array_equal(grad_nan, grad)


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_value_loss_matches_numpy(eps):
    g = rng(10)
    old = g.normal(size=(B, T)).astype(np.float32)
    new = (old + 0.3 * g.normal(size=(B, T))).astype(np.float32)
    ret = (old + g.normal(size=(B, T))).astype(np.float32)
    loss, metrics = ppo.value_loss(with_garbage(new, MASK, np.nan), with_garbage(old, MASK), with_garbage(ret, MASK),
                                   MASK, eps)
    want_loss, want_metrics = np_value_loss(new, old, ret, MASK, eps)
    np.testing.assert_allclose(loss, want_loss, atol=1e-6, rtol=0)
    assert 0.0 < want_metrics["vf_clipfrac"] < 1.0
    for name, want in want_metrics.items():
        np.testing.assert_allclose(metrics[name], want, atol=1e-6, rtol=0, err_msg=name)
    grad = np.asarray(jax.grad(lambda v: ppo.value_loss(v, old, ret, MASK, eps)[0])(new))
    h = 1e-6
    for b, t in zip(*np.nonzero(MASK)):
        plus, minus = new.astype(np.float64), new.astype(np.float64)
        plus[b, t] += h
        minus[b, t] -= h
        fd = (np_value_loss(plus, old, ret, MASK, eps)[0] - np_value_loss(minus, old, ret, MASK, eps)[0]) / (2 * h)
        np.testing.assert_allclose(grad[b, t], fd, atol=1e-6, rtol=0)
    assert np.all(grad[~MASK] == 0)


def test_ppo_loss_combines_terms_and_reports_metrics():
    g = rng(11)
    new_lp, old_lp, adv = policy_batch()
    old_v = g.normal(size=(B, T)).astype(np.float32)
    new_v = (old_v + 0.3 * g.normal(size=(B, T))).astype(np.float32)
    ret = (old_v + g.normal(size=(B, T))).astype(np.float32)
    entropy = g.uniform(0.5, 3.0, size=(B, T)).astype(np.float32)

    @jax.jit
    def run(new_lp, new_v, ent_coef):
        return ppo.ppo_loss(new_lp, old_lp, adv, new_v, old_v, ret, MASK, entropy=entropy, vf_coef=0.1,
                            ent_coef=ent_coef)

    loss, metrics = run(new_lp, new_v, 0.01)
    pg, pg_metrics = np_policy_loss(new_lp, old_lp, adv, MASK, 0.2)
    vf, vf_metrics = np_value_loss(new_v, old_v, ret, MASK, 0.2)
    ent = np_masked_mean(entropy, MASK)
    np.testing.assert_allclose(loss, pg + 0.1 * vf - 0.01 * ent, atol=1e-6, rtol=0)
    want = {**pg_metrics, **vf_metrics, "pg_loss": pg, "vf_loss": vf, "entropy": ent,
            "loss": pg + 0.1 * vf - 0.01 * ent, "explained_variance": np_explained_variance(new_v, ret, MASK)}
    assert set(metrics) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, atol=1e-5, rtol=0, err_msg=name)
    # without entropy: no entropy term or metric, and ent_coef must stay 0
    loss_no_ent, metrics_no_ent = ppo.ppo_loss(new_lp, old_lp, adv, new_v, old_v, ret, MASK)
    np.testing.assert_allclose(loss_no_ent, pg + 0.1 * vf, atol=1e-6, rtol=0)
    assert "entropy" not in metrics_no_ent
    with pytest.raises(PosiError, match="ent_coef"):
        ppo.ppo_loss(new_lp, old_lp, adv, new_v, old_v, ret, MASK, ent_coef=0.01)


def test_losses_all_masked_are_finite_with_zero_gradient():
    new, old, adv = policy_batch()
    empty = np.zeros_like(MASK)
    loss, metrics = ppo.ppo_loss(new, old, adv, new, old, adv, empty, entropy=np.ones((B, T), np.float32),
                                 ent_coef=0.01)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())
    grad = jax.grad(lambda n: ppo.ppo_loss(n, old, adv, n, old, adv, empty)[0])(new)
    np.testing.assert_array_equal(grad, 0.0)


def test_fully_masked_row_changes_nothing():
    """Dropping the fully masked row 4 from the batch gives identical losses and metrics."""
    new, old, adv = policy_batch()
    keep = [b for b in range(B) if b != 4]
    full = ppo.ppo_loss(new, old, adv, new, old, adv, MASK)
    dropped = ppo.ppo_loss(new[keep], old[keep], adv[keep], new[keep], old[keep], adv[keep], MASK[keep])
    np.testing.assert_allclose(full[0], dropped[0], atol=1e-7)
    for name in full[1]:
        np.testing.assert_allclose(full[1][name], dropped[1][name], atol=1e-6, err_msg=name)


def test_shape_mismatch_is_a_posi_error():
    with pytest.raises(PosiError, match=r"advantages has shape \(2, 3\) but mask has shape \(2, 4\)"):
        ppo.policy_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.ones((2, 4), bool))


def test_rollout_to_loss_chain_matches_numpy():
    """compute_rewards -> GAE -> whitening -> ppo_loss, as the trainer chains them, against the numpy chain."""
    g = rng(12)
    logprobs = (g.normal(size=(B, T)) - 2).astype(np.float32)
    ref_logprobs = (logprobs + 0.2 * g.normal(size=(B, T))).astype(np.float32)
    values = g.normal(size=(B, T)).astype(np.float32)
    score = g.normal(size=(B,)).astype(np.float32)
    new_logprobs = (logprobs + 0.3 * g.normal(size=(B, T))).astype(np.float32)
    new_values = (values + 0.3 * g.normal(size=(B, T))).astype(np.float32)

    @jax.jit
    def chain(new_logprobs, new_values, kl_coef):
        rewards, _ = ppo.compute_rewards(score, logprobs, ref_logprobs, MASK, kl_coef, kind="k1")
        advantages, returns = ppo.gae_advantages(rewards, values, MASK, 1.0, 0.95)
        advantages = ppo.masked_whiten(advantages, MASK)
        return ppo.ppo_loss(new_logprobs, logprobs, advantages, new_values, values, returns, MASK)[0]

    rewards, _ = np_rewards(score, logprobs, ref_logprobs, MASK, 0.2, "k1")
    advantages, returns = np_gae(rewards, values, MASK, 1.0, 0.95)
    advantages = np_whiten(advantages, MASK)
    want = np_policy_loss(new_logprobs, logprobs, advantages, MASK, 0.2)[0]
    want += 0.1 * np_value_loss(new_values, values, returns, MASK, 0.2)[0]
    np.testing.assert_allclose(chain(new_logprobs, new_values, 0.2), want, atol=1e-5, rtol=0)
