"""posi_jax.rl.kl controllers against a plain numpy loop of Ziegler et al.'s update."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.errors import PosiError
from posi_jax.rl.kl import AdaptiveKLController, FixedKLController, make_kl_controller

# Measured KLs around the target 0.02: far below (error clipped at -0.2), near, exactly on, far above (clipped at +0.2).
KLS = [0.0, 0.001, 0.015, 0.02, 0.022, 0.5, 3.0, 0.019, 0.03, 0.01, 0.0241, 0.016, 0.2, 0.0]
N_STEPS = [64, 64, 128, 64, 32, 256, 64, 64, 1000, 64, 64, 8, 64, 5000]


def np_adaptive(init, target, horizon, kls, n_steps):
    value, history = float(init), []
    for kl, n in zip(kls, n_steps):
        proportional_error = min(max(kl / target - 1.0, -0.2), 0.2)
        value *= 1.0 + proportional_error * n / horizon
        history.append(value)
    return np.array(history)


def test_defaults_are_the_issues():
    ctl = AdaptiveKLController()
    assert (ctl.init_kl_coef, ctl.target, ctl.horizon) == (0.2, 0.02, 10000.0)
    assert FixedKLController().kl_coef == 0.2


@pytest.mark.parametrize("init,target,horizon", [(0.2, 0.02, 10000.0), (0.05, 6.0, 2000.0)])
def test_adaptive_sequence_matches_numpy_loop(init, target, horizon):
    ctl = AdaptiveKLController(init_kl_coef=init, target=target, horizon=horizon)
    kls = [k * target / 0.02 for k in KLS]  # same regions relative to the target
    want = np_adaptive(init, target, horizon, kls, N_STEPS)
    # in Python, one jitted update at a time (the controller's state is a plain fp32 array)
    update = jax.jit(ctl.update)
    state, got = ctl.init(), []
    assert state.dtype == jnp.float32 and state.shape == ()
    for kl, n in zip(kls, N_STEPS):
        state = update(state, kl, n)
        got.append(float(state))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # the same sequence inside one lax.scan, as it would run in a jitted train loop
    scanned = jax.jit(lambda s, k, n: jax.lax.scan(lambda c, x: (ctl.update(c, *x),) * 2, s, (k, n))[1])(
        ctl.init(), jnp.asarray(kls, jnp.float32), jnp.asarray(N_STEPS, jnp.int32))
    np.testing.assert_allclose(scanned, want, rtol=1e-6, atol=0)
    print(f"adaptive KL: max rel err {np.max(np.abs(np.asarray(got) / want - 1)):.2e}, final {got[-1]:.6f}")


def test_adaptive_error_is_clipped_both_sides():
    ctl = AdaptiveKLController(init_kl_coef=1.0, target=0.02, horizon=100.0)
    up = float(ctl.update(ctl.init(), 10.0, 10))  # error clipped at +0.2 -> *1.02
    down = float(ctl.update(ctl.init(), 0.0, 10))  # error -1 clipped at -0.2 -> *0.98
    same = float(ctl.update(ctl.init(), 0.02, 10))  # on target -> unchanged
    small = float(ctl.update(ctl.init(), 0.021, 10))  # error 0.05, inside the clip -> *1.005
    np.testing.assert_allclose([up, down, same, small], [1.02, 0.98, 1.0, 1.005], rtol=1e-6)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(kl_coef=0.1)
    state = ctl.init()
    for kl, n in zip(KLS, N_STEPS):
        state = jax.jit(ctl.update)(state, kl, n)
    assert state.dtype == jnp.float32 and float(state) == np.float32(0.1)


def test_make_kl_controller_and_validation():
    assert make_kl_controller(True, 0.3, 0.05, 200.0) == AdaptiveKLController(0.3, 0.05, 200.0)
    assert make_kl_controller(False, 0.3) == FixedKLController(0.3)
    with pytest.raises(PosiError, match="target must be > 0"):
        AdaptiveKLController(target=0.0)
    with pytest.raises(PosiError, match="horizon must be > 0"):
        AdaptiveKLController(horizon=-1.0)
    with pytest.raises(PosiError, match="kl_coef must be >= 0"):
        FixedKLController(kl_coef=-0.1)
