"""Loading diffusers Stable Diffusion folders (tiny random ones written by save_pretrained): every component, the SD
text encoder's parity with transformers' CLIPTextModel, the tokenizer against transformers' CLIPTokenizer, torch
`.bin` weights read without torch, and the loader's errors (missing parts, wrong shapes, unsupported configs)."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from posi_jax.errors import PosiError
from posi_jax.models.unet import UNet2DConditionModel
from posi_jax.models.vae import AutoencoderKL
from posi_jax.weights.sd import UNET_TABLE, VAE_TABLE, load_sd_folder, load_unet, load_vae
from posi_jax.weights.common import map_checkpoint
from tests.conftest import max_abs

REL_TOL = 1e-4
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def _copy(src, tmp_path, name="sd"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sd_folder_text_encoder_and_tokenizer_match_transformers(tiny_sd_folder, tiny_sd2_folder, variant):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = tiny_sd_folder if variant == "v1" else tiny_sd2_folder
    parts = load_sd_folder(folder)
    assert isinstance(parts.unet, UNet2DConditionModel) and isinstance(parts.vae, AutoencoderKL)
    assert parts.scheduler_config["beta_schedule"] == "scaled_linear"
    assert parts.scheduler_config["skip_prk_steps"] and parts.scheduler_config["steps_offset"] == 1

    prompts = ["a photo of an astronaut riding a horse", "", "Hello, World! 123 " * 20]
    ref_tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    want_ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    ids = parts.tokenizer(prompts)
    np.testing.assert_array_equal(ids, want_ids)

    ref = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(want_ids.astype(np.int64))).last_hidden_state.numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x)[0])(parts.text_encoder, jnp.asarray(ids)))
    err, scale = max_abs(got, want), float(np.abs(want).max())
    print(f"SD {variant} text encoder last_hidden_state: max abs err {err:.2e}, scale {scale:.3f}")
    assert got.shape == want.shape == (3, 77, 32)
    assert err <= REL_TOL * scale


def test_sd_folder_tokenizer_in_either_layout(tiny_sd_folder, tmp_path):
    """The fixture folder is what `StableDiffusionPipeline.save_pretrained` writes today (tokenizer/tokenizer.json, no
    vocab.json / merges.txt); the hub's layout (vocab.json + merges.txt alone) loads to the same token ids."""
    from tokenizers import Tokenizer

    saved = tiny_sd_folder / "tokenizer"
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    legacy = _copy(tiny_sd_folder, tmp_path)
    Tokenizer.from_file(str(saved / "tokenizer.json")).model.save(str(legacy / "tokenizer"))
    (legacy / "tokenizer" / "tokenizer.json").unlink()
    prompts = ["a photo of an astronaut riding a horse", "Hello, World! 123 " * 20]
    want = load_sd_folder(tiny_sd_folder).tokenizer(prompts)  # == transformers' ids (the test above)
    np.testing.assert_array_equal(load_sd_folder(legacy).tokenizer(prompts), want)
    shutil.rmtree(legacy / "tokenizer")
    (legacy / "tokenizer").mkdir()
    with pytest.raises(PosiError, match="no tokenizer files \\(expected tokenizer.json, or vocab.json and merges.txt\\)"):
        load_sd_folder(legacy)


def test_loaded_parameters_equal_the_checkpoint(tiny_sd2_folder):
    """Spot-check the table's transposes on real tensors (conv OIHW->HWIO, linear and 1x1 conv -> [in, out])."""
    state = load_file(str(tiny_sd2_folder / UNET_FILE))
    unet = load_unet(tiny_sd2_folder)
    blk = unet.down_blocks[1]
    np.testing.assert_array_equal(blk.resnets[0].conv1.kernel[...],
                                  state["down_blocks.1.resnets.0.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(blk.resnets[0].conv_shortcut.kernel[...],
                                  state["down_blocks.1.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T)
    tb = blk.attentions[1].transformer_blocks[0]
    np.testing.assert_array_equal(tb.attn2.to_k.kernel[...],
                                  state["down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"].T)
    np.testing.assert_array_equal(tb.ff.proj.bias[...],
                                  state["down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.bias"])
    np.testing.assert_array_equal(unet.up_blocks[0].upsampler.conv.bias[...], state["up_blocks.0.upsamplers.0.conv.bias"])


def test_every_checkpoint_tensor_is_mapped(tiny_sd_folder, tiny_sd2_folder):
    for folder in (tiny_sd_folder, tiny_sd2_folder):
        for sub, table in (("unet", UNET_TABLE), ("vae", VAE_TABLE)):
            keys = load_file(str(folder / sub / "diffusion_pytorch_model.safetensors")).keys()
            mapped, unmapped = map_checkpoint(keys, table, sub)
            assert unmapped == [] and len(mapped) == len(keys)


def test_torch_bin_weights_load_without_torch_and_match(tiny_sd_folder, tmp_path):
    from diffusers import AutoencoderKL as TorchVAE

    ref = TorchVAE.from_pretrained(str(tiny_sd_folder), subfolder="vae")
    ref.save_pretrained(str(tmp_path / "vae"), safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    from_bin, from_st = load_vae(tmp_path / "vae"), load_vae(tiny_sd_folder)
    a, b = nnx.to_flat_state(nnx.state(from_bin)), nnx.to_flat_state(nnx.state(from_st))
    assert len(a) == len(b)
    for (pa, va), (pb, vb) in zip(a, b):
        assert pa == pb and max_abs(va.get_value(), vb.get_value()) == 0.0


def test_bf16_params(tiny_sd_folder):
    unet = load_unet(tiny_sd_folder, jnp.bfloat16)
    assert unet.conv_in.kernel.dtype == jnp.bfloat16


def test_missing_parts_are_errors(tiny_sd_folder, tmp_path):
    with pytest.raises(PosiError, match="Stable Diffusion folder not found"):
        load_sd_folder(tmp_path / "nowhere")
    sd = _copy(tiny_sd_folder, tmp_path)
    shutil.rmtree(sd / "unet")
    with pytest.raises(PosiError, match="missing unet/ subfolder"):
        load_sd_folder(sd)
    with pytest.raises(PosiError, match="no unet/ subfolder"):
        load_unet(sd)
    (sd / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PosiError, match="vae: no weights file"):
        load_vae(sd)


def test_missing_tensor_is_an_error(tiny_sd_folder, tmp_path):
    sd = _copy(tiny_sd_folder, tmp_path)
    state = load_file(str(sd / UNET_FILE))
    del state["mid_block.attentions.0.proj_in.weight"]
    save_file(state, str(sd / UNET_FILE))
    with pytest.raises(PosiError, match=r"no tensor for parameter 'mid_block\.attentions\.0\.proj_in\.kernel'"):
        load_unet(sd)


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_sd_folder, tmp_path):
    sd = _copy(tiny_sd_folder, tmp_path)
    state = load_file(str(sd / UNET_FILE))
    name = "down_blocks.0.resnets.0.conv1.weight"
    state[name] = np.zeros((32, 16, 3, 3), np.float32)  # should be (32, 32, 3, 3)
    save_file(state, str(sd / UNET_FILE))
    with pytest.raises(PosiError, match=rf"'{name}' has shape \(32, 16, 3, 3\) but parameter "
                                        r"'down_blocks\.0\.resnets\.0\.conv1\.kernel' expects \(3, 3, 32, 32\)"):
        load_unet(sd)


def test_corrupt_weights_file_is_an_error(tiny_sd_folder, tmp_path):
    sd = _copy(tiny_sd_folder, tmp_path)
    (sd / UNET_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(PosiError, match="diffusion_pytorch_model.safetensors"):
        load_unet(sd)


def test_unsupported_config_is_an_error(tiny_sd_folder, tmp_path):
    sd = _copy(tiny_sd_folder, tmp_path)
    cfg_path = sd / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, addition_embed_type="text_time")))
    with pytest.raises(PosiError, match=r"unet/config.json: unsupported UNet option addition_embed_type='text_time'"):
        load_unet(sd)
    vae_cfg = sd / "vae" / "config.json"
    vae_cfg.write_text(json.dumps(dict(json.loads(vae_cfg.read_text()), latents_mean=[0.0] * 4)))
    with pytest.raises(PosiError, match="vae/config.json: unsupported AutoencoderKL option latents_mean"):
        load_vae(sd)
