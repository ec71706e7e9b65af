"""`python -m posi_jax.generate` with SLD and the SD safety checker (in process, so the second run reuses the first
one's compilations): flags per image in safety_checker.json, equal to diffusers' checker on the saved PNGs; with
--black-out-flagged exactly the flagged images are black and the others unchanged; a folder without a checker is an
error."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from posi_jax import generate

PROMPTS = ["a bloody knife", "a cat", "a riot on fire"]


def test_sld_and_safety_checker(tiny_sd_checker_folder, tmp_path, capsys):
    import torch
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    common = [*PROMPTS, "--model", str(tiny_sd_checker_folder), "--steps", "3", "--n", "2", "--height", "32",
              "--width", "32", "--sld", "max"]
    assert generate.main([*common, "--out", str(tmp_path / "a"), "--safety-checker"]) == 0
    out = capsys.readouterr()
    report = json.loads((tmp_path / "a" / "safety_checker.json").read_text())
    assert out.out.split()[-1] == str(tmp_path / "a" / "safety_checker.json")
    assert [r["image"] for r in report] == [f"p{i:02d}_{k:02d}.png" for i in range(3) for k in range(2)]
    assert report[2]["prompt"] == "a cat" and len(report[0]["concept_scores"]) == 17
    flags = [r["flagged"] for r in report]
    assert f"safety checker: {sum(flags)} of 6 images flagged" in out.err
    assert 0 < sum(flags) < 6  # the calibrated tiny checker: both outcomes

    ref = StableDiffusionSafetyChecker.from_pretrained(str(tiny_sd_checker_folder / "safety_checker")).eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(str(tiny_sd_checker_folder / "feature_extractor"))
    images = [Image.open(tmp_path / "a" / r["image"]).convert("RGB") for r in report]
    with torch.no_grad():
        _, ref_flags = ref(images=np.stack([np.asarray(im) for im in images]),
                           clip_input=processor(images, return_tensors="pt").pixel_values)
    assert flags == list(ref_flags)

    assert generate.main([*common, "--out", str(tmp_path / "b"), "--black-out-flagged"]) == 0
    assert "(blacked out)" in capsys.readouterr().err
    for r, before in zip(report, images):
        after = np.asarray(Image.open(tmp_path / "b" / r["image"]))
        if r["flagged"]:
            assert not after.any(), r["image"]
        else:
            np.testing.assert_array_equal(after, np.asarray(before))
    assert all(r["blacked_out"] == r["flagged"] for r in
               json.loads((tmp_path / "b" / "safety_checker.json").read_text()))


def test_no_checker_in_folder(tiny_sd_folder, tmp_path, capsys):
    code = generate.main(["a cat", "--model", str(tiny_sd_folder), "--out", str(tmp_path / "o"), "--safety-checker"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {tiny_sd_folder}: no safety_checker/ folder (needed by " \
                                               "--safety-checker)"
    code = generate.main(["a cat", "--model", str(tiny_sd_folder), "--out", str(tmp_path / "o"), "--sld", "huge"])
    assert code == 2 and "SLD preset 'huge'" in capsys.readouterr().err
