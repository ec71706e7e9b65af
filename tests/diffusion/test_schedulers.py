"""Schedulers vs diffusers' torch schedulers: same config, same fixed model outputs, every step within 1e-5.

Our steps run inside one jitted `lax.scan` (the way the pipeline uses them); diffusers' run in its Python loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.diffusion.schedulers import make_scheduler
from posi_jax.errors import PosiError
from tests.sd_fixtures import SCHEDULER_V14

TOL = 1e-5
SHAPE = (2, 8, 8, 4)  # NHWC latents

DIFFUSERS_CLASS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                   "euler": "EulerDiscreteScheduler"}

# (scheduler, config, steps): SD v1.4's own config for each, plus the other schedules/spacings/prediction types
CASES = [
    ("pndm", SCHEDULER_V14, 25),
    ("pndm", dict(SCHEDULER_V14, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing",
                  steps_offset=0, prediction_type="v_prediction"), 12),
    ("pndm", dict(SCHEDULER_V14, beta_schedule="squaredcos_cap_v2"), 10),
    ("ddim", dict(SCHEDULER_V14, clip_sample=False), 20),
    ("ddim", dict(SCHEDULER_V14, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0,
                  prediction_type="v_prediction"), 10),
    ("ddim", dict(SCHEDULER_V14, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), 12),  # clips x0
    ("dpmpp_2m", SCHEDULER_V14, 20),
    ("dpmpp_2m", dict(SCHEDULER_V14, timestep_spacing="linspace", steps_offset=0), 10),
    ("dpmpp_2m", dict(SCHEDULER_V14, timestep_spacing="trailing", prediction_type="v_prediction",
                      final_sigmas_type="sigma_min", solver_type="heun"), 16),
    ("euler", SCHEDULER_V14, 20),
    ("euler", dict(SCHEDULER_V14, timestep_spacing="linspace", steps_offset=0, prediction_type="v_prediction"), 10),
    ("euler", dict(SCHEDULER_V14, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                   timestep_spacing="trailing", final_sigmas_type="sigma_min"), 15),
]


def _diffusers_scheduler(name: str, config: dict):
    import diffusers

    return getattr(diffusers, DIFFUSERS_CLASS[name]).from_config(config)


def _reference_run(name, config, steps, model_outputs, x_init):
    """diffusers' loop (NCHW torch), returning the timesteps, init_noise_sigma, and every model input / sample."""
    import torch

    sched = _diffusers_scheduler(name, config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x_init.transpose(0, 3, 1, 2).copy()) * sched.init_noise_sigma
    inputs, samples = [], []
    for i, t in enumerate(sched.timesteps):
        inputs.append(sched.scale_model_input(x, t).numpy().transpose(0, 2, 3, 1))
        mo = torch.from_numpy(model_outputs[i].transpose(0, 3, 1, 2).copy())
        x = sched.step(mo, t, x).prev_sample
        samples.append(x.numpy().transpose(0, 2, 3, 1))
    return sched.timesteps.numpy(), float(sched.init_noise_sigma), np.stack(inputs), np.stack(samples)


def _our_run(sched, steps, model_outputs, x_init):
    state = sched.init_state(SHAPE, steps)

    @jax.jit
    def run(state, model_outputs, x):
        def body(carry, inp):
            x, state = carry
            i, mo = inp
            model_input = sched.scale_model_input(state, x, i)
            x, state = sched.step(state, mo, i, x)
            return (x, state), (model_input, x)

        _, (inputs, samples) = jax.lax.scan(body, (x, state), (jnp.arange(len(model_outputs)), model_outputs))
        return inputs, samples

    x = jnp.asarray(x_init) * sched.init_noise_sigma(steps)
    return [np.asarray(a) for a in run(state, jnp.asarray(model_outputs), x)]


@pytest.mark.parametrize("name,config,steps", CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_matches_diffusers(name, config, steps):
    sched = make_scheduler(name, config)
    ts = sched.timesteps(steps)
    rng = np.random.default_rng(steps)
    # Outputs close to one fixed noise (a consistent denoiser keeps its noise estimate), perturbed at every step, so
    # the trajectory stays at realistic magnitudes instead of diverging.
    x_init = rng.standard_normal(SHAPE).astype(np.float32)
    model_outputs = (x_init + 0.2 * rng.standard_normal((len(ts), *SHAPE))).astype(np.float32)

    ref_ts, ref_sigma, ref_inputs, ref_samples = _reference_run(name, config, steps, model_outputs, x_init)
    np.testing.assert_array_equal(ts, ref_ts)
    assert ts.dtype == ref_ts.dtype
    assert sched.init_noise_sigma(steps) == pytest.approx(ref_sigma, rel=1e-7)

    inputs, samples = _our_run(sched, steps, model_outputs, x_init)
    np.testing.assert_allclose(inputs, ref_inputs, rtol=0, atol=TOL * max(1.0, float(np.abs(ref_inputs).max())))
    # float32 rounding (1 ulp per step) accumulates along the trajectory: 1e-5 absolute at unit scale, relative to
    # the largest sample where the noise scale is larger (Euler's sigma_max = 157 with the linear betas)
    scale = max(1.0, float(np.abs(ref_samples).max()))
    err = np.abs(samples - ref_samples).max(axis=(1, 2, 3, 4))
    print(f"{name} steps={steps} max abs err {err.max():.2e} at sample scale {scale:.3g}")
    assert err.max() <= TOL * scale, f"max abs error per step {err} (sample scale {scale:.3g})"
    assert 0.1 < np.abs(ref_samples).max() < 1e3  # a real trajectory: neither zeros nor diverging


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_noise_schedule_is_bit_identical(beta_schedule):
    cfg = dict(SCHEDULER_V14, beta_schedule=beta_schedule)
    ours = make_scheduler("ddim", cfg).schedule.alphas_cumprod()
    np.testing.assert_array_equal(ours, _diffusers_scheduler("ddim", cfg).alphas_cumprod.numpy())


def test_scheduler_is_a_hashable_static_value():
    """jit caches on it (a static argument): equal configs give equal, equally hashed schedulers."""
    a, b = make_scheduler("pndm", SCHEDULER_V14), make_scheduler("pndm", dict(SCHEDULER_V14))
    assert a == b and hash(a) == hash(b)
    assert a != make_scheduler("pndm", dict(SCHEDULER_V14, steps_offset=0))


def test_folder_class_name_picks_the_scheduler():
    cfg = dict(SCHEDULER_V14, _class_name="PNDMScheduler", _diffusers_version="0.42.0")
    assert make_scheduler(None, cfg).name == "pndm"
    assert make_scheduler("dpmpp_2m", cfg).name == "dpmpp_2m"
    # DDIM built from a PNDM config takes DDIM's own default for keys the config lacks, as diffusers' from_config
    assert make_scheduler("ddim", SCHEDULER_V14).clip_sample is True


def test_pndm_history_buffer_is_fixed_size():
    sched = make_scheduler("pndm", SCHEDULER_V14)
    state = sched.init_state(SHAPE, 10)
    x = jnp.ones(SHAPE)
    shapes = jax.tree.map(jnp.shape, state)
    step = jax.jit(sched.step)
    for i in range(6):
        x, state = step(state, x * 0.5, i, x)
        assert jax.tree.map(jnp.shape, state) == shapes


@pytest.mark.parametrize("name,config,match", [
    ("pndm", dict(SCHEDULER_V14, beta_schedule="sigmoid"), "beta_schedule='sigmoid'"),
    ("ddim", dict(SCHEDULER_V14, timestep_spacing="karras"), "timestep_spacing='karras'"),
    ("euler", dict(SCHEDULER_V14, prediction_type="sample"), "prediction_type='sample'"),
    ("pndm", dict(SCHEDULER_V14, skip_prk_steps=False), "skip_prk_steps"),
    ("ddim", dict(SCHEDULER_V14, thresholding=True), "thresholding=True"),
    ("dpmpp_2m", dict(SCHEDULER_V14, use_karras_sigmas=True), "use_karras_sigmas"),
    ("dpmpp_2m", dict(SCHEDULER_V14, algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    ("dpmpp_2m", dict(SCHEDULER_V14, solver_order=3), "solver_order=3"),
    ("euler", dict(SCHEDULER_V14, trained_betas=[0.1, 0.2]), "trained_betas"),
    ("euler", dict(SCHEDULER_V14, mystery_knob=1), "unknown option 'mystery_knob'"),
    ("lms", SCHEDULER_V14, "unknown scheduler 'lms'"),
    (None, dict(SCHEDULER_V14, _class_name="LMSDiscreteScheduler"), "LMSDiscreteScheduler"),
])
def test_unsupported_config_errors(name, config, match):
    with pytest.raises(PosiError, match=match):
        make_scheduler(name, config)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_step_count(steps):
    with pytest.raises(PosiError, match="num_steps"):
        make_scheduler("pndm", SCHEDULER_V14).timesteps(steps)
