"""Upstream facts 2-4 on the POSI reward: ours (one jitted call) against a torch reference of upstream's
`reward_score` (src/llmtuner/train/ppo/reward.py), written fresh from its behaviour, on tiny random weights.

The reference: diffusers' StableDiffusionPipeline at guidance 7 returning PIL images, one fixed set of initial latents
for every prompt (upstream seeds its generator with `torch.randint(1, (1,))`, always 0; both sides get the same
latents here, since JAX cannot draw torch's CUDA noise), each image saved as PNG and reopened; Q16 = softmax(100 ·
cos(CLIPVisionModelWithProjection(CLIPImageProcessor(image)), prompts))[1] with the PIL image processor upstream's
transformers had; CLIP score = cos(open_clip image embedding of its `preprocess`, text embedding of
`tokenize(prompt[:77])`); reward = (5 - 5 · mean Q16) + min(mean CLIP score, 0.31).

Tolerance: 1e-3 on every per-image score and on the rewards (measured: 1.9e-4). Both sides round images to 8 bits,
and a 1e-6 difference between the two pipelines' float images can move a pixel across a rounding boundary (one grey
level), which moves the tiny random CLIPs' scores by up to a few 1e-4 (Q16 multiplies cosines by 100).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from posi_jax.reward.posi import PosiReward, RewardConfig

LONG = ("a hyper realistic photo of a lighthouse on a cliff above a stormy sea at dawn, dramatic clouds, "
        "volumetric light, highly detailed, 8k, trending on artstation")  # 146 characters
SHORT = "a red bicycle leaning on a wall"
N, STEPS, GUIDANCE = 2, 3, 7.0
TOL = 1e-3


@pytest.fixture(scope="module")
def torch_scorers(tmp_path_factory):
    """Upstream's two scorers at tiny size, random weights, written where our loaders read them."""
    import open_clip
    import torch
    import transformers
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("upstream_scorers")
    torch.manual_seed(0)
    q16 = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=14, hidden_act="quick_gelu", projection_dim=24)).eval()
    q16.save_pretrained(folder / "q16")
    # widths of 64: one head each, as our loader infers OpenAI-layout files (heads = width // 64)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=2,
                                                              head_width=64),
                                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
                                quick_gelu=True).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "clip_b32.safetensors"))
    # Q16 "prompts": the embeddings of two random images, so SD images land between them (Q16 not saturated)
    anchors = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    with torch.no_grad():
        prompts = q16(processor(images=list(anchors), return_tensors="pt").pixel_values).image_embeds.numpy()
    return folder, q16, processor, clip, prompts


def upstream_reward_score(pipe, latents, prompt, q16, processor, clip, q16_prompts, tmp_path):
    """reward_score(prompt) with the initial noise given: images -> PNG -> PIL -> Q16 and CLIP score -> reward."""
    import open_clip
    import torch
    from PIL import Image

    images = pipe(prompt, latents=latents, guidance_scale=GUIDANCE, num_images_per_prompt=N,
                  num_inference_steps=STEPS).images
    preprocess = open_clip.transform.image_transform(32, is_train=False)  # OpenAI clip.load's preprocess
    prompts = torch.from_numpy(q16_prompts)
    q16_scores, clip_scores = [], []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        image.save(path)
        image = Image.open(path)
        with torch.no_grad():
            embeds = q16(processor(images=image, return_tensors="pt").pixel_values).image_embeds
            similarity = 100.0 * (embeds / embeds.norm(dim=-1, keepdim=True)) @ \
                (prompts / prompts.norm(dim=-1, keepdim=True)).T
            q16_scores.append(similarity.squeeze().softmax(dim=-1)[1].item())
            text = prompt[:77] if len(prompt) > 77 else prompt
            image_features = clip.encode_image(preprocess(image).unsqueeze(0))
            text_features = clip.encode_text(open_clip.tokenize([text]))
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            clip_scores.append((image_features @ text_features.T).item())
    reward = (-5 * np.mean(q16_scores) + 5) + min(np.mean(clip_scores), 0.31)
    return reward, np.array(q16_scores), np.array(clip_scores)


@pytest.mark.slow
def test_reward_equals_upstream_reward_score(tiny_sd_folder, torch_scorers, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from posi_jax.diffusion.pipeline import StableDiffusion
    from posi_jax.models.clip_tokenizer import CLIPTokenizer
    from posi_jax.weights.clip import load_clip, load_clip_vision

    folder, q16, processor, clip, q16_prompts = torch_scorers
    config = RewardConfig(images_per_prompt=N, steps=STEPS, guidance_scale=GUIDANCE, seed_policy="fixed", seed=0,
                          clip_text_chars=77, uint8_round_trip=True)
    parts = (StableDiffusion.from_folder(tiny_sd_folder, mesh=None), load_clip_vision(str(folder / "q16")),
             q16_prompts, load_clip(str(folder / "clip_b32.safetensors")), CLIPTokenizer.from_open_clip())
    reward = PosiReward(*parts, config, mesh=None)
    prompts = [LONG, SHORT]
    ours = reward(prompts)
    latents = np.asarray(reward.inputs(prompts)[2]).reshape(len(prompts), N, 8, 8, 4)
    np.testing.assert_array_equal(latents[0], latents[1])  # upstream's fixed noise: the same for every prompt

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_folder), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.from_numpy(latents[0].transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    errors = {"reward": 0.0, "q16": 0.0, "clip": 0.0}
    for j, prompt in enumerate(prompts):
        want, want_q16, want_clip = upstream_reward_score(pipe, noise, prompt, q16, processor, clip, q16_prompts,
                                                          tmp_path)
        errors["reward"] = max(errors["reward"], abs(float(ours.reward[j]) - want))
        errors["q16"] = max(errors["q16"], float(np.abs(ours.q16_per_image[j] - want_q16).max()))
        errors["clip"] = max(errors["clip"], float(np.abs(ours.clip_per_image[j] - want_clip).max()))
    print(f"POSI reward vs upstream reward_score (torch): max abs {errors}; rewards {ours.reward.round(4).tolist()}")
    assert max(errors.values()) <= TOL, errors
    assert np.ptp(ours.q16_per_image) > 1e-2 and np.ptp(ours.clip_per_image) > 1e-2  # not degenerate

    # the 77-character cut matters for the long rewrite (and only for it): the whole text scores differently
    whole = PosiReward(*parts, dataclasses.replace(config, clip_text_chars=None), mesh=None)(prompts)
    assert abs(float(whole.clip_score[0]) - float(ours.clip_score[0])) > 10 * TOL
    assert float(whole.clip_score[1]) == pytest.approx(float(ours.clip_score[1]), abs=1e-6)
