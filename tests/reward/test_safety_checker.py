"""The SD safety checker: the scoring math against a numpy transcription of the reference's per-image loop (special-care
adjustment and rounding cases built by hand), and the whole checker (weights loaded from a tiny random
`safety_checker/` + `feature_extractor/` written by diffusers/transformers) against diffusers'
`StableDiffusionSafetyChecker` fed by transformers' `CLIPImageProcessor`, as the reference pipeline runs them."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from posi_jax.errors import PosiError
from posi_jax.reward.safety_checker import black_out, check_images_numpy, safety_checker_scores
from posi_jax.weights.sd import has_safety_checker, load_sd_safety_checker


def reference_loop(special_cos, concept_cos, special_thresholds, concept_thresholds):
    """The reference's decision for each image, written as its loop: float32 scores, Python round to 3 decimals, the
    0.01 adjustment switched on by the first positive special-care score."""
    special_cos, concept_cos = np.asarray(special_cos, np.float32), np.asarray(concept_cos, np.float32)
    out = []
    for i in range(len(concept_cos)):
        adjustment, special, concepts = 0.0, [], []
        for j, w in enumerate(special_thresholds):
            special.append(round(special_cos[i, j] - float(w) + adjustment, 3))
            if special[-1] > 0:
                adjustment = 0.01
        for k, w in enumerate(concept_thresholds):
            concepts.append(round(concept_cos[i, k] - float(w) + adjustment, 3))
        out.append((special, concepts, adjustment > 0, any(c > 0 for c in concepts)))
    return out


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("special_raw,concept_raw,care,flagged", [
    # special 1 positive: special 2 (raw 0.0003) is then reported with the adjustment; concept 0 (raw -0.005) is
    # pushed over 0 by special care alone
    ([-0.1, 0.004, 0.0003], [-0.005, -0.2, -0.3], True, True),
    # scores that round to 0 are not positive: no special care, no flag
    ([-0.1, -0.0004, 0.0004], [0.0004, -0.3, -0.0004], False, False),
    ([-0.2, -0.2, -0.2], [-0.3, 0.0007, -0.1], False, True),  # rounds up to 0.001: a flag
    ([0.3, 0.2, 0.1], [-0.0111, -0.2, -0.3], True, False),  # special care, but -0.0011 stays below 0
])
def test_scores_follow_the_reference_loop(special_raw, concept_raw, care, flagged):
    rng = np.random.default_rng(0)
    dim = 8
    image = rng.normal(size=(1, dim)).astype(np.float32)
    special, concept = rng.normal(size=(3, dim)), rng.normal(size=(3, dim))
    special_cos, concept_cos = _unit(image) @ _unit(special).T, _unit(image) @ _unit(concept).T
    # thresholds that put each raw score (cosine − threshold) where the case wants it
    special_w = (special_cos[0] - np.asarray(special_raw)).astype(np.float32)
    concept_w = (concept_cos[0] - np.asarray(concept_raw)).astype(np.float32)
    got = safety_checker_scores(jnp.asarray(image), jnp.asarray(concept, jnp.float32), jnp.asarray(concept_w),
                                jnp.asarray(special, jnp.float32), jnp.asarray(special_w))
    [(want_special, want_concepts, want_care, want_flag)] = reference_loop(special_cos, concept_cos, special_w,
                                                                            concept_w)
    assert (want_care, want_flag) == (care, flagged)  # the case is what it says
    assert bool(got["special_care"][0]) == care and bool(got["flagged"][0]) == flagged
    np.testing.assert_allclose(np.asarray(got["special_scores"][0]), want_special, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["concept_scores"][0]), want_concepts, atol=1e-6)


IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def checker_folder(tmp_path_factory):
    from tests.sd_fixtures import add_safety_checker

    return add_safety_checker(tmp_path_factory.mktemp("sd_with_checker"), IMAGE_SIZE)


def _reference(folder, images: np.ndarray):
    """diffusers' checker exactly as StableDiffusionPipeline.run_safety_checker calls it, plus the cosines it
    computes internally (recomputed with its own modules and cosine function)."""
    import torch
    import transformers
    from diffusers.pipelines.stable_diffusion import safety_checker as ref_module
    from diffusers.utils import numpy_to_pil

    checker = ref_module.StableDiffusionSafetyChecker.from_pretrained(str(folder / "safety_checker")).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder / "feature_extractor"))
    pixels = processor(numpy_to_pil(images), return_tensors="pt").pixel_values
    out, flags = checker(images=images.copy(), clip_input=pixels)
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        special_cos = ref_module.cosine_distance(embeds, checker.special_care_embeds).numpy()
        concept_cos = ref_module.cosine_distance(embeds, checker.concept_embeds).numpy()
    loop = reference_loop(special_cos, concept_cos, checker.special_care_embeds_weights.detach().numpy(),
                          checker.concept_embeds_weights.detach().numpy())
    return out, np.asarray(flags), loop


@pytest.mark.parametrize("size", [IMAGE_SIZE, 2 * IMAGE_SIZE], ids=["same size", "resized"])
def test_checker_matches_diffusers(size, tmp_path):
    from tests.sd_fixtures import add_safety_checker, smooth_images

    images = smooth_images(8, size, seed=size)
    folder = add_safety_checker(tmp_path, IMAGE_SIZE, calibration_images=images)
    assert has_safety_checker(folder)
    checker = load_sd_safety_checker(folder)
    ref_images, ref_flags, loop = _reference(folder, images)
    got = check_images_numpy(checker, images)
    want_concepts, want_special = np.asarray([c for _, c, _, _ in loop]), np.asarray([s for s, _, _, _ in loop])
    diff = np.abs(np.concatenate([(got["concept_scores"] - want_concepts).ravel(),
                                  (got["special_scores"] - want_special).ravel()]))
    print(f"{size}px: flags {got['flagged'].astype(int)}, special care {got['special_care'].astype(int)}; rounded "
          f"scores: {np.sum(diff > 5e-4)} of {diff.size} one step (1e-3) apart, max abs {diff.max():.1e}")
    np.testing.assert_array_equal(got["flagged"], ref_flags)
    assert 0 < ref_flags.sum() < len(ref_flags)  # both outcomes are exercised
    np.testing.assert_array_equal(got["special_care"], [care for _, _, care, _ in loop])
    assert 0 < got["special_care"].sum() < len(ref_flags)
    # rounded to 1e-3: a cosine 1e-6 away from a rounding boundary may land on the neighbouring value
    assert diff.max() <= 1.001e-3 and np.mean(diff) < 1e-4
    # blacked out as the reference returns them
    np.testing.assert_array_equal(np.asarray(black_out(jnp.asarray(images), got["flagged"])), ref_images)
    # the same images as uint8 (what the evaluation scores) give the same flags: the reference quantises too
    u8 = np.round(images * 255).astype(np.uint8)
    np.testing.assert_array_equal(check_images_numpy(checker, u8)["flagged"], ref_flags)


def test_older_nested_checkpoint_layout(checker_folder, tmp_path):
    """transformers < 5 (every SD folder on the hub) nests the tower as vision_model.vision_model.*"""
    import shutil

    from safetensors.numpy import load_file, save_file

    from tests.sd_fixtures import smooth_images

    folder = tmp_path / "old"
    shutil.copytree(checker_folder, folder)
    state = load_file(str(folder / "safety_checker" / "model.safetensors"))
    nested = {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in state.items()}
    assert any(k.startswith("vision_model.vision_model.") for k in nested)
    save_file(nested, str(folder / "safety_checker" / "model.safetensors"))
    images = smooth_images(4, IMAGE_SIZE, seed=1)
    a = check_images_numpy(load_sd_safety_checker(checker_folder), images)
    b = check_images_numpy(load_sd_safety_checker(folder), images)
    np.testing.assert_array_equal(a["concept_scores"], b["concept_scores"])


def test_loading_errors(checker_folder, tmp_path):
    import shutil

    with pytest.raises(PosiError, match="no safety_checker/ folder"):
        load_sd_safety_checker(tmp_path)
    folder = tmp_path / "sd"
    shutil.copytree(checker_folder, folder)
    config = folder / "feature_extractor" / "preprocessor_config.json"
    original = json.loads(config.read_text())
    for change, message in [({"resample": 2}, "resample=2 is not supported"),
                            ({"crop_size": {"height": 16, "width": 16}}, "crop 16 must both be the checker's input"),
                            ({"do_normalize": False}, "do_normalize=False is not supported")]:
        config.write_text(json.dumps(dict(original, **change)))
        with pytest.raises(PosiError, match=message):
            load_sd_safety_checker(folder)
    config.write_text(json.dumps(original))
    # a transformers 4.x config: `vision_config_dict` overrides `vision_config`, as CLIPConfig reads it
    checker_config = folder / "safety_checker" / "config.json"
    cfg = json.loads(checker_config.read_text())
    checker_config.write_text(json.dumps(dict(cfg, vision_config=dict(cfg["vision_config"], num_hidden_layers=5),
                                              vision_config_dict={"num_hidden_layers": 2})))
    assert len(load_sd_safety_checker(folder).vision_model.encoder.layers) == 2
    checker_config.write_text(json.dumps(dict(cfg, vision_config=dict(cfg["vision_config"], num_hidden_layers=3))))
    with pytest.raises(PosiError, match="no tensor for parameter 'vision_model.encoder.layers.2"):
        load_sd_safety_checker(folder)
    shutil.rmtree(folder / "feature_extractor")
    with pytest.raises(PosiError, match="safety_checker/ without feature_extractor/"):
        load_sd_safety_checker(folder)
