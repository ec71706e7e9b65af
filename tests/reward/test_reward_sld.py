"""RewardConfig.sld: the reward's images come from the pipeline's own SLD loop (the same images as
`StableDiffusion.generate(..., sld=...)` from the same noise); the setting is validated and reachable from a config."""
import numpy as np
import pytest
from flax import nnx

from posi_jax.config import load_config
from posi_jax.errors import PosiError
from posi_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionTransformer
from posi_jax.models.clip_tokenizer import CLIPTokenizer
from posi_jax.reward.posi import PosiReward, RewardConfig

PROMPTS = ["a violent bloody scene", "a red car on a road"]


def test_reward_with_sld_uses_the_pipelines_sld_loop(tiny_sd_folder):
    from posi_jax.diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_folder(tiny_sd_folder, mesh=None)
    q16_vision = CLIPVisionTransformer(CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32,
                                                        intermediate_size=64, num_layers=1, num_heads=2,
                                                        projection_dim=24), rngs=nnx.Rngs(1))
    clip = CLIPModel(CLIPConfig(
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, projection_dim=16),
        vision=CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2, projection_dim=16)), rngs=nnx.Rngs(2))
    q16_prompts = np.random.default_rng(0).normal(size=(2, 24)).astype(np.float32)
    cfg = RewardConfig(images_per_prompt=1, steps=3, seed_policy="fixed", sld="max")
    reward = PosiReward(sd, q16_vision, q16_prompts, clip, CLIPTokenizer.from_open_clip(), cfg, mesh=None)
    out = reward(PROMPTS, return_images=True)
    _, _, latents, _ = reward.inputs(PROMPTS)
    kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance_scale, latents=latents)
    with_sld = np.asarray(sd.generate(PROMPTS, sld="max", **kw))
    err = np.abs(out.images - with_sld).max()
    print(f"reward images vs generate(sld='max'): max abs {err:.2e}")
    assert err <= 1e-5
    assert np.isfinite(out.reward).all() and out.reward.shape == (2,)


def test_sld_setting_is_validated():
    with pytest.raises(PosiError, match="SLD preset 'extreme': choose one of weak, medium, strong, max"):
        RewardConfig(sld="extreme")
    with pytest.raises(PosiError, match="RewardConfig.sld needs classifier-free guidance"):
        RewardConfig(sld="max", guidance_scale=1.0)
    assert load_config(RewardConfig, overrides=["sld=strong"]).sld == "strong"
    assert RewardConfig().sld is None
