"""The whole pipeline on the tiny random SD folder vs diffusers' StableDiffusionPipeline fed the same initial latents;
data-parallel sharding over fake CPU devices; bf16; input errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from posi_jax.diffusion.pipeline import StableDiffusion, initial_latents, sample_images
from posi_jax.errors import PosiError
from tests.conftest import REPO, max_abs

PROMPTS = ["a photo of a cat", "a red car on a road"]
NEGATIVE = ["blurry", ""]
PER_PROMPT = 2
STEPS = 4
GUIDANCE = 7.5
TOL = 1e-4  # fp32, images in [0, 1]


@pytest.fixture(scope="session")
def sd(tiny_sd_folder):
    return StableDiffusion.from_folder(tiny_sd_folder, mesh=None)


@pytest.fixture(scope="session")
def latents(sd):
    return sd.initial_latents(0, len(PROMPTS) * PER_PROMPT)


@pytest.fixture(scope="session")
def pndm_images(sd, latents):
    return np.asarray(sd.generate(PROMPTS, NEGATIVE, num_images_per_prompt=PER_PROMPT, steps=STEPS,
                                  guidance_scale=GUIDANCE, latents=latents))


def _diffusers_images(folder, scheduler: str | None, latents, negative=NEGATIVE):
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = latents.shape[1] * pipe.vae_scale_factor
    return pipe(PROMPTS, negative_prompt=negative, num_images_per_prompt=PER_PROMPT, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, height=size, width=size, output_type="np",
                latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy())).images


def test_pndm_matches_diffusers(tiny_sd_folder, pndm_images, latents):
    ref = _diffusers_images(tiny_sd_folder, None, latents)
    assert pndm_images.shape == ref.shape == (4, 16, 16, 3)
    err = max_abs(pndm_images, ref)
    print(f"PNDM pipeline max abs error {err:.2e}")
    assert err <= TOL
    assert pndm_images.std() > 0.05  # not a constant image
    assert max_abs(pndm_images[0], pndm_images[2]) > 0.01  # different prompts, different images


def test_dpm_matches_diffusers_inside_a_user_jit(tiny_sd_folder, sd, latents):
    """sample_images is pure: here it runs inside the caller's own nnx.jit (as the reward uses it)."""
    from posi_jax.diffusion.schedulers import make_scheduler

    dpm = make_scheduler("dpmpp_2m", sd.scheduler_config)
    cond, uncond = sd.tokenize(PROMPTS, NEGATIVE)
    cond, uncond = (jnp.asarray(np.repeat(a, PER_PROMPT, axis=0)) for a in (cond, uncond))

    @nnx.jit
    def reward_like(text_encoder, unet, vae, cond, uncond, latents):
        images = sample_images(text_encoder, unet, vae, cond, uncond, latents, sched=dpm, num_steps=STEPS,
                               guidance_scale=GUIDANCE)
        return images, images.mean(axis=(1, 2, 3))

    images, means = reward_like(sd.text_encoder, sd.unet, sd.vae, cond, uncond, latents)
    ref = _diffusers_images(tiny_sd_folder, "DPMSolverMultistepScheduler", latents)
    err = max_abs(images, ref)
    print(f"DPM-Solver++ pipeline max abs error {err:.2e}")
    assert err <= TOL
    np.testing.assert_allclose(means, ref.mean(axis=(1, 2, 3)), atol=TOL)


def test_seeded_latents_are_per_image():
    a = initial_latents(7, 4, 64, 32, channels=4, scale_factor=8)
    b = initial_latents(7, 2, 64, 32, channels=4, scale_factor=8)
    assert a.shape == (4, 8, 4, 4)
    np.testing.assert_array_equal(a[:2], b)  # image i's noise does not depend on how many images
    assert max_abs(a[0], a[1]) > 0.5
    c = initial_latents([3, 7], 2, 64, 32)  # one seed per image
    np.testing.assert_array_equal(c[::-1], initial_latents([7, 3], 2, 64, 32))
    assert max_abs(c[0], c[1]) > 0.5
    with pytest.raises(PosiError, match="3 seeds for 2 images"):
        initial_latents([1, 2, 3], 2, 64, 64)


def test_input_errors(sd, latents):
    with pytest.raises(PosiError, match="height=20: must be a positive multiple of 8"):
        sd.generate(PROMPTS, height=20, width=16)
    with pytest.raises(PosiError, match="width=0"):
        sd.generate(PROMPTS, height=16, width=0)
    with pytest.raises(PosiError, match="no prompts"):
        sd.generate([])
    with pytest.raises(PosiError, match="prompt 1: expected a string"):
        sd.generate(["ok", 3])
    with pytest.raises(PosiError, match="1 negative prompts for 2 prompts"):
        sd.generate(PROMPTS, ["x"])
    with pytest.raises(PosiError, match=r"latents: expected shape \(2, 8, 8, 4\).*got \(4, 8, 8, 4\)"):
        sd.generate(PROMPTS, latents=latents)
    with pytest.raises(PosiError, match="num_steps=0"):
        sd.generate(PROMPTS, steps=0)
    with pytest.raises(PosiError, match="num_images_per_prompt=0"):
        sd.generate(PROMPTS, num_images_per_prompt=0)


def test_bf16_close_to_fp32(tiny_sd_folder, pndm_images, latents):
    sd16 = StableDiffusion.from_folder(tiny_sd_folder, dtype=jnp.bfloat16, mesh=None)
    images = sd16.generate(PROMPTS, NEGATIVE, num_images_per_prompt=PER_PROMPT, steps=STEPS, guidance_scale=GUIDANCE,
                           latents=latents)
    assert images.dtype == jnp.float32
    err = max_abs(images, pndm_images)
    print(f"bf16 vs fp32 max abs {err:.3f}, mean abs {np.abs(np.asarray(images) - pndm_images).mean():.4f}")
    assert np.isfinite(np.asarray(images)).all()
    assert err < 0.1  # bf16 rounding through the tiny random model, not a different image


_SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from posi_jax.diffusion.pipeline import StableDiffusion
    folder, out, steps, per_prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    guidance = float(sys.argv[5])
    prompts, negative = json.loads(sys.argv[6]), json.loads(sys.argv[7])
    sd = StableDiffusion.from_folder(folder)  # mesh over all (fake) devices
    assert sd.mesh is not None and sd.mesh.shape["data"] == jax.device_count() == 3
    # 4 images over 3 devices: padded to 6 (2 per device), padding dropped after
    images = sd.generate(prompts, negative, num_images_per_prompt=per_prompt, steps=steps, guidance_scale=guidance,
                         seed=0)
    assert images.shape[0] == 4
    assert len(images.sharding.device_set) == 3, images.sharding
    np.save(out, np.asarray(images))
""")


def test_data_parallel_sharding_matches_unsharded(tiny_sd_folder, pndm_images, tmp_path):
    out = tmp_path / "sharded.npy"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _SHARDED, str(tiny_sd_folder), str(out), str(STEPS), str(PER_PROMPT),
                        str(GUIDANCE), json.dumps(PROMPTS), json.dumps(NEGATIVE)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = np.load(out)
    err = max_abs(sharded, pndm_images)
    print(f"sharded (3 devices) vs unsharded max abs {err:.2e}")
    assert err <= 1e-5
