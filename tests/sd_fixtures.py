"""Tiny random Stable Diffusion folders in the diffusers layout, written by diffusers/transformers `save_pretrained`.

Used by the `tiny_sd_folder` / `tiny_sd2_folder` session fixtures in tests/conftest.py. Each folder is loadable by
diffusers' `StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)` and by
`posi_jax.weights.sd.load_sd_folder`.

v1: SD v1.x-style UNet (conv proj_in/proj_out, `attention_head_dim` = heads per block as one int), quick_gelu text
    encoder, PNDM scheduler config of SD v1.4.
v2: SD v2.x-style UNet (linear proj_in/proj_out, per-block `attention_head_dim` list, upcast_attention), gelu text
    encoder (as OpenCLIP ViT-H), same scheduler.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

TOKENIZER_MERGES = 486  # 256 byte symbols * 2 + merges + SOT/EOT = 1000 tokens
TEXT_VOCAB = 512 + TOKENIZER_MERGES + 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

SCHEDULER_V14 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, trained_betas=None,
                     prediction_type="epsilon", timestep_spacing="leading")

UNET_V1 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
               norm_num_groups=8)
UNET_V2 = dict(UNET_V1, block_out_channels=(32, 64, 64), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
           latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
TEXT = dict(vocab_size=TEXT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=TEXT_VOCAB - 2,
            eos_token_id=TEXT_VOCAB - 1, pad_token_id=TEXT_VOCAB - 1, projection_dim=32)


def write_clip_tokenizer_folder(folder: Path, legacy: bool = False) -> None:
    """A CLIP BPE tokenizer folder from the first merges of open_clip's vocabulary, saved by transformers (version 5
    writes tokenizer.json + tokenizer_config.json only). `legacy`: also vocab.json + merges.txt, as SD folders on the
    hub ship them (written by the `tokenizers` library)."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:TOKENIZER_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=EOT, model_max_length=77)
    tok.save_pretrained(str(folder))
    if legacy:
        tok.backend_tokenizer.model.save(str(folder))


def build_tiny_sd_folder(folder: Path, variant: str = "v1", seed: int = 0) -> Path:
    """The folder exactly as the installed diffusers/transformers save it (tokenizer/: tokenizer.json, no vocab.json)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if variant not in ("v1", "v2"):
        raise ValueError(variant)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(UNET_V1 if variant == "v1" else UNET_V2))
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(CLIPTextConfig(**dict(TEXT, hidden_act="quick_gelu" if variant == "v1" else "gelu")))
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every tensor non-trivial for parity tests
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(0.02 * torch.randn_like(p))
    write_clip_tokenizer_folder(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=PNDMScheduler(**SCHEDULER_V14), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


CHECKER_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
CHECKER_PROJECTION = 16


def smooth_images(n: int, size: int, seed: int):
    """float32 [n, size, size, 3] in [0, 1]: upsampled 4x4 noise, smooth as decoded images are."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (n, 4, 4, 3)).astype(np.uint8)
    up = [np.asarray(Image.fromarray(s).resize((size, size), Image.Resampling.BICUBIC)) for s in small]
    return np.stack(up).astype(np.float32) / 255.0


def add_safety_checker(folder: Path, image_size: int = 32, calibration_images=None, seed: int = 0) -> Path:
    """Write a tiny random `StableDiffusionSafetyChecker` (safety_checker/) and its CLIPImageProcessor
    (feature_extractor/) into an SD folder, registered in model_index.json as diffusers does.

    A random tower embeds every image in nearly one direction, so thresholds drawn at random flag all images or none.
    Instead two concepts and one special-care concept get thresholds in the middle of the cosines of
    `calibration_images` (float [N, H, W, 3] in [0, 1]; default: smooth random images), the others never fire: about
    half of such images are flagged, and special care (its + 0.01) decides some of them."""
    import numpy as np
    import torch
    import transformers
    from diffusers.pipelines.stable_diffusion import safety_checker as ref
    from diffusers.utils import numpy_to_pil

    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(CHECKER_VISION, image_size=image_size), projection_dim=CHECKER_PROJECTION)
    checker = ref.StableDiffusionSafetyChecker(config).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
    if calibration_images is None:
        calibration_images = smooth_images(16, image_size, seed)
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        pixels = processor(numpy_to_pil(np.asarray(calibration_images)), return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        concept = np.median(ref.cosine_distance(embeds, checker.concept_embeds).numpy(), axis=0)
        special = np.median(ref.cosine_distance(embeds, checker.special_care_embeds).numpy(), axis=0)
        checker.concept_embeds_weights.fill_(1.0)  # a cosine never exceeds 1: these concepts never fire
        checker.concept_embeds_weights[[3, 11]] = torch.from_numpy(concept[[3, 11]] + np.float32(0.005))
        checker.special_care_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights[1] = float(special[1])
    checker.save_pretrained(str(folder / "safety_checker"))
    processor.save_pretrained(str(folder / "feature_extractor"))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2))
    return folder


def copy_with_safety_checker(sd_folder: Path, folder: Path, image_size: int = 32) -> Path:
    """A copy of an SD folder with a tiny safety checker calibrated on the folder's own images (diffusers, 3 steps,
    image_size px): about half of such images are flagged."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline

    shutil.copytree(sd_folder, folder, dirs_exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a photo", "a dog", "blood", "a street", "a house", "a face"], num_images_per_prompt=2,
                  num_inference_steps=3, height=image_size, width=image_size, output_type="np",
                  generator=torch.manual_seed(1)).images
    return add_safety_checker(folder, image_size, calibration_images=images)
