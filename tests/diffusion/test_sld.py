"""Safe Latent Diffusion: the step math against a numpy loop written from the paper's equations, and the whole pipeline
with every preset against diffusers' StableDiffusionPipelineSafe on the tiny random SD folder (same initial latents)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.diffusion.pipeline import StableDiffusion
from posi_jax.diffusion.sld import SLD_PRESETS, SLDConfig, sld_config, sld_guidance
from posi_jax.errors import PosiError
from tests.conftest import REPO, max_abs

PROMPTS = ["a photo of a cat", "a red car on a road"]
NEGATIVE = ["blurry", ""]
PER_PROMPT = 1
GUIDANCE = 7.5
# 18 PNDM steps = 19 model evaluations: past every preset's warm-up (weak: 15), so each preset's safety term acts
STEPS = 18
TOL = 1e-4  # as the pipeline's parity tests: fp32, images in [0, 1]


def numpy_sld(eps_u, eps_p, eps_s, guidance_scale, cfg: SLDConfig):
    """ε per step for a sequence of UNet outputs [T, ...], from eqs. 3-8 of Schramowski et al. (2023)."""
    momentum = np.zeros_like(eps_u[0], np.float64)
    out = []
    for i in range(len(eps_u)):
        # the difference in float32, as both implementations take it: an element exactly at λ stays exactly there
        diff = (eps_p[i] - eps_s[i]).astype(np.float64)
        u, p, s = (a[i].astype(np.float64) for a in (eps_u, eps_p, eps_s))
        mu = np.where(diff < np.float32(cfg.threshold), np.minimum(cfg.guidance_scale * np.abs(diff), 1.0), 0.0)
        gamma = mu * (s - u) + cfg.momentum_scale * momentum
        momentum = cfg.momentum_beta * momentum + (1 - cfg.momentum_beta) * gamma
        applied = gamma if i >= cfg.warmup_steps else 0.0
        out.append(u + guidance_scale * (p - u - applied))
    return np.stack(out)


@pytest.mark.parametrize("cfg", [*SLD_PRESETS.values(),
                                 SLDConfig(warmup_steps=2, guidance_scale=50.0, threshold=-0.02, momentum_scale=0.8,
                                           momentum_beta=0.9)], ids=[*SLD_PRESETS, "custom"])
def test_step_math_matches_numpy(cfg):
    rng = np.random.default_rng(0)
    steps, shape = 20, (2, 4, 4, 3)
    eps_u = rng.normal(size=(steps, *shape)).astype(np.float32)
    # the prompt and concept predictions close to each other (as SD's are), so the strength is not always clipped
    eps_s = (eps_u + 0.05 * rng.normal(size=eps_u.shape)).astype(np.float32)
    eps_p = (eps_s + 0.02 * rng.normal(size=eps_u.shape)).astype(np.float32)
    eps_p[:, 0, 0, 0] = eps_s[:, 0, 0, 0] + np.float32(cfg.threshold)  # exactly at λ: left alone (>=)
    want = numpy_sld(eps_u, eps_p, eps_s, GUIDANCE, cfg)

    @jax.jit
    def run(eps_u, eps_p, eps_s, params):  # the hyper-parameters traced, as in the pipeline
        def body(momentum, xs):
            i, u, p, s = xs
            direction, momentum = sld_guidance(u, p, s, momentum, i, params)
            return momentum, u + GUIDANCE * direction
        return jax.lax.scan(body, jnp.zeros(shape, jnp.float32), (jnp.arange(steps), eps_u, eps_p, eps_s))[1]

    got = np.asarray(run(eps_u, eps_p, eps_s, cfg.params()))
    err = max_abs(got, want)
    assert err <= 1e-4 * max(1.0, np.abs(want).max()), err
    # the safety term does something once the warm-up is over, and nothing before
    plain = eps_u + GUIDANCE * (eps_p - eps_u)
    assert max_abs(got[steps - 1], plain[steps - 1]) > 1e-3
    if cfg.warmup_steps:
        np.testing.assert_allclose(got[: cfg.warmup_steps], plain[: cfg.warmup_steps], rtol=1e-6, atol=1e-5)


def test_presets_and_config_errors():
    assert sld_config("MAX") is SLD_PRESETS["max"] and sld_config(None) is None
    assert SLD_PRESETS["medium"] == SLDConfig()  # the reference's default call arguments are the medium preset
    with pytest.raises(PosiError, match="SLD preset 'extreme': choose one of weak, medium, strong, max"):
        sld_config("extreme")
    with pytest.raises(PosiError, match="guidance_scale must be > 1"):
        SLDConfig(guidance_scale=1.0)
    with pytest.raises(PosiError, match="warmup_steps must be an integer >= 0"):
        SLDConfig(warmup_steps=-1)
    with pytest.raises(PosiError, match="momentum_beta must be in"):
        SLDConfig(momentum_beta=1.5)
    with pytest.raises(PosiError, match="threshold must be a finite number"):
        SLDConfig(threshold=float("nan"))


@pytest.fixture(scope="module")
def sd(tiny_sd_folder):
    return StableDiffusion.from_folder(tiny_sd_folder, mesh=None)


@pytest.fixture(scope="module")
def ours(sd):
    """Every preset's images from the same latents (the presets share one compilation)."""
    latents = sd.initial_latents(0, len(PROMPTS) * PER_PROMPT)
    images = {name: np.asarray(sd.generate(PROMPTS, NEGATIVE, steps=STEPS, latents=latents, sld=name,
                                           num_images_per_prompt=PER_PROMPT, guidance_scale=GUIDANCE))
              for name in SLD_PRESETS}
    return latents, images


def test_every_preset_matches_diffusers_safe_pipeline(tiny_sd_folder, ours):
    import torch
    from diffusers import StableDiffusionPipelineSafe
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    pipe = StableDiffusionPipelineSafe.from_pretrained(str(tiny_sd_folder), safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_concept == SLD_PRESETS["max"].concept
    latents, images = ours
    kw = dict(num_images_per_prompt=PER_PROMPT, guidance_scale=GUIDANCE)
    ref_kw = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, height=16, width=16, output_type="np",
                  latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy()), **kw)
    with pytest.warns(UserWarning, match="Safety checker disabled"):  # its name for "no SLD"
        plain = pipe(PROMPTS, sld_guidance_scale=0.0, **ref_kw).images
    for name, cfg in SLD_PRESETS.items():
        ref_cfg = getattr(SafetyConfig, name.upper())
        assert ref_cfg == {"sld_warmup_steps": cfg.warmup_steps, "sld_guidance_scale": cfg.guidance_scale,
                           "sld_threshold": cfg.threshold, "sld_momentum_scale": cfg.momentum_scale,
                           "sld_mom_beta": cfg.momentum_beta}
        ref = pipe(PROMPTS, **ref_kw, **ref_cfg).images
        err, effect = max_abs(images[name], ref), max_abs(images[name], plain)
        print(f"SLD {name}: max abs error {err:.2e} vs diffusers; changes the images by up to {effect:.3f}")
        assert err <= TOL
        assert effect > 1e-3  # the safety guidance acted


def test_sld_input_errors(sd):
    with pytest.raises(PosiError, match="SLD needs classifier-free guidance"):
        sd.generate(PROMPTS, steps=2, guidance_scale=1.0, sld="max")
    with pytest.raises(PosiError, match="SLD preset 'nope'"):
        sd.generate(PROMPTS, steps=2, sld="nope")
    with pytest.raises(PosiError, match="concept must be a non-empty string"):
        dataclasses.replace(SLD_PRESETS["max"], concept=" ")


_SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from posi_jax.diffusion.pipeline import StableDiffusion
    folder, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts, negative, latents = json.loads(sys.argv[4]), json.loads(sys.argv[5]), np.load(sys.argv[6])
    sd = StableDiffusion.from_folder(folder)  # mesh over both (fake) devices: one image each
    assert sd.mesh.shape["data"] == jax.device_count() == 2
    images = sd.generate(prompts, negative, steps=steps, latents=latents, sld="max", guidance_scale=7.5)
    assert len(images.sharding.device_set) == 2, images.sharding
    np.save(out, np.asarray(images))
""")


def test_sld_sharded_over_two_devices_equals_one_device(tiny_sd_folder, ours, tmp_path):
    """The concept row and the momentum follow each image onto its device: sharding changes nothing."""
    latents, images = ours
    np.save(tmp_path / "latents.npy", np.asarray(latents))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(tiny_sd_folder), str(tmp_path / "out.npy"), str(STEPS),
                        json.dumps(PROMPTS), json.dumps(NEGATIVE), str(tmp_path / "latents.npy")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    err = max_abs(np.load(tmp_path / "out.npy"), images["max"])
    print(f"SLD max sharded (2 devices) vs unsharded max abs {err:.2e}")
    # max's strength min(5000·|ε_p − ε_S|, 1) turns the 1e-7 float noise of other matmul batch shapes into ~1e-5
    assert err <= TOL
