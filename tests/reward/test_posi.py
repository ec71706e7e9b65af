"""The POSI reward: the formula vs a plain-Python copy of upstream's; the jitted reward (tiny random SD + tiny random
CLIPs) vs a step-by-step computation from our own components; options; bad input."""
import dataclasses

import numpy as np
import pytest
from flax import nnx

from posi_jax.models.clip_tokenizer import CLIPTokenizer
from posi_jax.config import load_config
from posi_jax.errors import PosiError
from posi_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionTransformer
from posi_jax.reward.clip_score import clip_score
from posi_jax.reward.posi import PosiReward, RewardConfig, RewardOutput, posi_reward_formula, score_images
from posi_jax.reward.preprocess import clip_preprocess
from posi_jax.reward.q16 import q16_inappropriate_prob

PROMPTS = ["a photo of a cat", "a violent bloody scene", "a red car on a road"]
# uint8_round_trip=False: the scores are a smooth function of the images, so the jitted reward and an eager
# step-by-step computation agree to float rounding (with the 8-bit rounding, a 1e-7 difference can flip a grey level)
CFG = RewardConfig(images_per_prompt=2, steps=3, seed_policy="fixed", uint8_round_trip=False)


def upstream_reward(q16_mean: float, clip_mean: float) -> float:
    """POSI's reward line, verbatim in plain Python: (5 - 5 * q16) + min(clip_score, 0.31)."""
    return (5 - 5 * q16_mean) + min(clip_mean, 0.31)


def test_formula_matches_upstream():
    cases = [(0.0, 0.0), (1.0, 0.5), (0.25, 0.31), (0.73, 0.2999), (0.5, 0.3101), (0.1, -0.05), (0.999, 0.9)]
    for q, c in cases:
        assert float(posi_reward_formula(q, c)) == pytest.approx(upstream_reward(q, c), abs=1e-6)
    q, c = np.array([x for x, _ in cases]), np.array([y for _, y in cases])
    np.testing.assert_allclose(np.asarray(posi_reward_formula(q, c)), [upstream_reward(*p) for p in cases], atol=1e-6)
    assert float(posi_reward_formula(0.2, 0.5, w=2.0, cap=0.4)) == pytest.approx(2.0 * 0.8 + 0.4)


@pytest.fixture(scope="module")
def tiny_clips():
    """Q16's vision tower (ViT-L/14-shaped small: patch 14) and a CLIP (ViT-B/32-shaped small), random weights."""
    q16_vision = CLIPVisionTransformer(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32,
                                                        intermediate_size=64, num_layers=2, num_heads=2,
                                                        projection_dim=24), rngs=nnx.Rngs(1))
    clip = CLIPModel(CLIPConfig(
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, projection_dim=16),
        vision=CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=2, projection_dim=16)), rngs=nnx.Rngs(2))
    # Q16 prompts: the embeddings of two random images, so that SD images land between them (Q16 not saturated)
    anchors = np.random.default_rng(3).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    q16_prompts = np.asarray(q16_vision.encode(clip_preprocess(anchors, 28)))
    return q16_vision, q16_prompts, clip, CLIPTokenizer.from_open_clip()


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_folder):
    from posi_jax.diffusion.pipeline import StableDiffusion

    return StableDiffusion.from_folder(tiny_sd_folder, mesh=None)


@pytest.fixture(scope="module")
def reward(tiny_sd, tiny_clips):
    return PosiReward(tiny_sd, *tiny_clips, CFG, mesh=None)


def test_reward_equals_step_by_step(reward, tiny_sd, tiny_clips):
    q16_vision, q16_prompts, clip, tok = tiny_clips
    out = reward(PROMPTS, return_images=True)
    n = CFG.images_per_prompt
    assert out.reward.shape == out.q16.shape == out.clip_score.shape == (3,)
    assert out.q16_per_image.shape == out.clip_per_image.shape == (3, n)

    # the images: the pipeline's own generate() from the same noise
    _, _, latents, _ = reward.inputs(PROMPTS)
    images = np.asarray(tiny_sd.generate(PROMPTS, num_images_per_prompt=n, steps=CFG.steps,
                                         guidance_scale=CFG.guidance_scale, latents=latents))
    assert images.shape == out.images.shape and images.shape[0] == 6
    err_img = np.abs(out.images - images).max()
    assert err_img <= 1e-5
    # step by step, eagerly, on the reward's images (the uint8 rounding inside the preprocessing would turn a 1e-7
    # image difference into a whole grey level here and there): preprocessing, each CLIP, Q16, CLIP score, formula
    images = out.images
    q16 = np.asarray(q16_inappropriate_prob(q16_vision.encode(clip_preprocess(images, 28, emulate_uint8=False)),
                                            q16_prompts))
    image_emb = np.asarray(clip.encode_image(clip_preprocess(images, 32, emulate_uint8=False)))
    text_emb = np.asarray(clip.encode_text(tok(PROMPTS)))
    cs = np.asarray(clip_score(image_emb, np.repeat(text_emb, n, axis=0)))
    q16, cs = q16.reshape(3, n), cs.reshape(3, n)
    want = [upstream_reward(float(a), float(b)) for a, b in zip(q16.mean(1), cs.mean(1))]
    err = max(np.abs(out.q16_per_image - q16).max(), np.abs(out.clip_per_image - cs).max(),
              np.abs(out.reward - want).max())
    print(f"jitted reward vs step by step: images max abs {err_img:.2e}, scores max abs {err:.2e}; "
          f"rewards {out.reward.round(4).tolist()}")
    assert err <= 5e-5  # fp32; Q16 multiplies cosine rounding by 100 before its softmax
    assert np.ptp(out.q16_per_image) > 1e-3 and np.ptp(out.clip_per_image) > 1e-3  # not degenerate

    # score_images on the same images: the same numbers
    again = score_images(q16_vision, q16_prompts, clip, images, tok(PROMPTS), images_per_prompt=n, w=5.0, cap=0.31,
                         uint8_round_trip=False)
    np.testing.assert_allclose(np.asarray(again["reward"]), out.reward, atol=5e-5)

    # the upstream 8-bit path, with the CLIP score against the original prompts: same images; scores within what
    # one grey level here and there moves them; the float uint8 path equals the uint8-image path
    upstream_like = dataclasses.replace(CFG, alignment_text="original", uint8_round_trip=True)
    other = ["a dog", "a peaceful meadow", "a blue bicycle"]
    out8 = PosiReward(tiny_sd, *tiny_clips, upstream_like, mesh=None)(PROMPTS, other)
    assert out8.images is None
    as_uint8 = np.round(images * 255).astype(np.uint8)
    ref8 = score_images(q16_vision, q16_prompts, clip, as_uint8, tok(other), images_per_prompt=n, w=5.0, cap=0.31)
    err8 = max(np.abs(out8.q16_per_image - np.asarray(ref8["q16_per_image"])).max(),
               np.abs(out8.clip_per_image - np.asarray(ref8["clip_per_image"])).max())
    print(f"8-bit path vs step by step on uint8 images: max abs {err8:.2e}")
    assert err8 <= 5e-3
    assert np.abs(out8.clip_per_image - out.clip_per_image).max() > 1e-2
    assert np.abs(out8.q16_per_image - out.q16_per_image).max() > 0  # the rounding option changes the scores


def test_seed_policies(reward, tiny_sd, tiny_clips):
    def latents(cfg, prompts, calls=0):
        r = PosiReward(tiny_sd, *tiny_clips, cfg, mesh=None)
        r.call_index = calls
        return np.asarray(r.initial_latents(prompts)).reshape(len(prompts), cfg.images_per_prompt, -1)

    fixed = latents(CFG, PROMPTS)
    np.testing.assert_array_equal(fixed[0], fixed[2])  # image j gets the same noise for every prompt ...
    assert np.abs(fixed[0, 0] - fixed[0, 1]).max() > 0.1  # ... and images differ within a prompt
    np.testing.assert_array_equal(latents(CFG, PROMPTS, calls=5), fixed)  # ... and every call
    per_call = dataclasses.replace(CFG, seed_policy="per_call")
    a, b = latents(per_call, PROMPTS, 0), latents(per_call, PROMPTS, 1)
    assert np.abs(a - b).max() > 0.1 and np.abs(a[0] - a[1]).max() > 0.1
    np.testing.assert_array_equal(a, latents(per_call, PROMPTS, 0))  # deterministic given seed and call number
    per_prompt = dataclasses.replace(CFG, seed_policy="per_prompt")
    x, y = latents(per_prompt, PROMPTS), latents(per_prompt, PROMPTS[::-1], 7)
    np.testing.assert_array_equal(x[0], y[2])  # the noise follows the prompt text
    assert np.abs(x[0] - x[1]).max() > 0.1
    assert np.abs(latents(dataclasses.replace(per_prompt, seed=1), PROMPTS) - x).max() > 0.1


def test_prompt_batches_equal_one_call(tiny_sd, tiny_clips):
    """prompt_batch=2 over 3 prompts: two jitted calls, the second padded with a repeat of its last prompt. Every
    prompt has its own noise (per_prompt seeds), so a prompt scored with another's rows would show."""
    cfg = dataclasses.replace(CFG, seed_policy="per_prompt")
    whole = PosiReward(tiny_sd, *tiny_clips, cfg, mesh=None)(PROMPTS, return_images=True)
    batched = PosiReward(tiny_sd, *tiny_clips, dataclasses.replace(cfg, prompt_batch=2), mesh=None)(
        PROMPTS, return_images=True)
    assert batched.images.shape == whole.images.shape and batched.images.shape[0] == 3 * cfg.images_per_prompt
    assert batched.q16_per_image.shape == (3, cfg.images_per_prompt)
    for field in RewardOutput._fields:
        np.testing.assert_allclose(getattr(batched, field), getattr(whole, field), atol=1e-5, err_msg=field)
    assert np.abs(whole.images[0] - whole.images[2]).max() > 0.05  # the check above could tell prompts apart
    for bad in (0, -1, 1.5, True):
        with pytest.raises(PosiError, match="prompt_batch"):
            RewardConfig(prompt_batch=bad)


def test_bad_inputs(reward, tiny_sd, tiny_clips):
    q16_vision, q16_prompts, clip, tok = tiny_clips
    with pytest.raises(PosiError, match="empty prompt list"):
        reward([])
    with pytest.raises(PosiError, match="rewritten prompt 1 is a int"):
        reward(["ok", 3])
    with pytest.raises(PosiError, match="must be a list of strings"):
        reward("a single string")
    original = PosiReward(tiny_sd, *tiny_clips, dataclasses.replace(CFG, alignment_text="original"), mesh=None)
    with pytest.raises(PosiError, match=r"needs one original prompt per rewritten prompt \(2\), got 1"):
        original(["a", "b"], ["a"])
    with pytest.raises(PosiError, match=r"Q16 prompts: expected shape \(2, 24\), got \(3, 24\)"):
        PosiReward(tiny_sd, q16_vision, np.zeros((3, 24), np.float32), clip, tok, CFG, mesh=None)
    with pytest.raises(PosiError, match=r"expected shape \(2, 24\), got \(2, 768\)"):
        PosiReward(tiny_sd, q16_vision, np.zeros((2, 768), np.float32), clip, tok, CFG, mesh=None)
    ids = tok(PROMPTS)
    kw = dict(images_per_prompt=2, w=5.0, cap=0.31)
    with pytest.raises(PosiError, match=r"expected images \[3 prompts x 2 images = 6, H, W, 3\], got shape \(5, 16, 16, 3\)"):
        score_images(q16_vision, q16_prompts, clip, np.zeros((5, 16, 16, 3), np.float32), ids, **kw)
    with pytest.raises(PosiError, match=r"\[N, H, W, 3\], got shape \(6, 3, 64, 64\)"):
        score_images(q16_vision, q16_prompts, clip, np.zeros((6, 3, 64, 64), np.float32), ids, **kw)
    with pytest.raises(PosiError, match="uint8 or float, got int32"):
        score_images(q16_vision, q16_prompts, clip, np.zeros((6, 64, 64, 3), np.int32), ids, **kw)
    with pytest.raises(PosiError, match="alignment_text 'both'"):
        RewardConfig(alignment_text="both")
    with pytest.raises(PosiError, match="seed_policy"):
        RewardConfig(seed_policy="random")
    with pytest.raises(PosiError, match="images_per_prompt must be ≥ 1"):
        RewardConfig(images_per_prompt=0)
    with pytest.raises(PosiError, match="unknown config key"):
        load_config(RewardConfig, overrides=["weight=3"])
    assert load_config(RewardConfig, overrides=["w=3", "alignment_text=original"]).w == 3.0


SHARDED_SCRIPT = r"""
import sys
import numpy as np
import jax
from flax import nnx
from posi_jax.models.clip_tokenizer import CLIPTokenizer
from posi_jax.diffusion.pipeline import StableDiffusion
from posi_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionTransformer
from posi_jax.reward.posi import PosiReward, RewardConfig

assert jax.device_count() == 2, jax.devices()
sd = StableDiffusion.from_folder(sys.argv[1], mesh=None)
q16 = CLIPVisionTransformer(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                             num_layers=1, num_heads=2, projection_dim=24), rngs=nnx.Rngs(1))
clip = CLIPModel(CLIPConfig(
    text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, projection_dim=16),
    vision=CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
                            num_heads=2, projection_dim=16)), rngs=nnx.Rngs(2))
prompts = np.random.default_rng(3).standard_normal((2, 24)).astype(np.float32)
cfg = RewardConfig(images_per_prompt=1, steps=2, seed_policy="fixed", uint8_round_trip=False)
texts = ["a cat", "a dog", "a car"]  # 3 images over 2 devices: padded to 4, padding dropped
sharded = PosiReward(sd, q16, prompts, clip, CLIPTokenizer.from_open_clip(), cfg)
assert sharded.mesh is not None and sharded.mesh.shape["data"] == 2
single = PosiReward(sd, q16, prompts, clip, CLIPTokenizer.from_open_clip(), cfg, mesh=None)
a, b = sharded(texts), single(texts)
err = max(np.abs(a.reward - b.reward).max(), np.abs(a.q16_per_image - b.q16_per_image).max(),
          np.abs(a.clip_per_image - b.clip_per_image).max())
print(f"sharded vs single device: max abs {err:.2e}")
assert err <= 1e-5, err
# two prompts per call, each call split over the 2 devices; the last call's second prompt is padding
chunked = PosiReward(sd, q16, prompts, clip, CLIPTokenizer.from_open_clip(), RewardConfig(
    images_per_prompt=1, steps=2, seed_policy="fixed", uint8_round_trip=False, prompt_batch=2))(texts)
err = np.abs(chunked.reward - b.reward).max()
print(f"sharded in prompt batches of 2 vs single device: max abs {err:.2e}")
assert chunked.reward.shape == (3,) and err <= 1e-5, err
"""


def test_sharded_over_two_devices_equals_single_device(tiny_sd_folder, tmp_path):
    """Data-parallel over a 2-device "data" mesh (fake CPU devices, in a subprocess so the flag takes effect)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(script), str(tiny_sd_folder)], env=env, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout[-500:])
    assert proc.returncode == 0, proc.stderr[-3000:]
