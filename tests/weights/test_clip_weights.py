"""CLIP checkpoint loading: HF folders (save_pretrained of tiny random transformers models) and OpenAI/open_clip state
dicts, parity of the loaded model with the torch model, and the loader's errors."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from posi_jax.errors import PosiError
from posi_jax.weights.clip import (
    load_clip,
    load_clip_text,
    load_clip_text_encoder,
    load_clip_vision,
)

TOL = 1e-4
VOCAB = 1000


def _text_cfg(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, eos_token_id=VOCAB - 1,
                bos_token_id=VOCAB - 2, pad_token_id=0)
    base.update(kw)
    return transformers.CLIPTextConfig(**base)


def _vision_cfg(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="quick_gelu", projection_dim=32)
    base.update(kw)
    return transformers.CLIPVisionConfig(**base)


def _ids(batch=3, t=77, eos=VOCAB - 1, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB - 2, size=(batch, t))
    ids[:, 0] = VOCAB - 2
    for b, n in enumerate([5, 20, t - 1][:batch]):
        ids[b, n] = eos
        ids[b, n + 1:] = 0 if eos != 0 else 1  # padding after EOS
    return ids.astype(np.int32)


def _save(model, folder):
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_text_encoder_folder_matches_transformers(tmp_path, act):
    torch.manual_seed(1)
    ref = transformers.CLIPTextModel(_text_cfg(hidden_act=act))
    folder = _save(ref, str(tmp_path / "text_encoder"))
    ours = load_clip_text_encoder(folder)
    ids = _ids()
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    hidden, pooled = ours(ids)
    err_h = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy()).max()
    err_p = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
    print(f"HF CLIPTextModel ({act}): last_hidden max abs {err_h:.2e}, pooled {err_p:.2e}")
    assert err_h <= TOL and err_p <= TOL
    assert ours.text_projection is None

    # diffusers' clip_skip=1: hidden_states[-2] through the final LayerNorm
    skip = load_clip_text_encoder(folder, skip_last_layers=1)
    with torch.no_grad():
        want = ref.final_layer_norm(out.hidden_states[-2]).numpy()
    err_s = np.abs(np.asarray(skip(ids)[0]) - want).max()
    print(f"clip_skip=1 max abs {err_s:.2e}")
    assert err_s <= TOL
    assert np.abs(np.asarray(skip(ids)[0]) - np.asarray(hidden)).max() > 1e-2  # the option changes the output


def test_hf_legacy_eos_token_id_pools_at_argmax(tmp_path):
    torch.manual_seed(2)
    ref = transformers.CLIPTextModel(_text_cfg(eos_token_id=2))  # legacy configs (SD v1.x): pool at argmax(ids)
    folder = _save(ref, str(tmp_path / "te"))
    ours = load_clip_text_encoder(folder)
    assert ours.config.eos_token_id is None
    ids = _ids()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).pooler_output.numpy()
    assert np.abs(np.asarray(ours(ids)[1]) - want).max() <= TOL


def test_hf_clip_model_folder_matches_transformers(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.CLIPConfig(text_config=_text_cfg().to_dict(), vision_config=_vision_cfg().to_dict(),
                                  projection_dim=32)
    ref = transformers.CLIPModel(cfg)
    folder = _save(ref, str(tmp_path / "clip"))
    ours = load_clip(folder)
    ids = _ids()
    pixels = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        t_ref = ref.get_text_features(input_ids=torch.from_numpy(ids).long())
        i_ref = ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        t_ref = getattr(t_ref, "pooler_output", t_ref).numpy()
        i_ref = getattr(i_ref, "pooler_output", i_ref).numpy()
    err_t = np.abs(np.asarray(ours.encode_text(ids)) - t_ref).max()
    err_i = np.abs(np.asarray(ours.encode_image(pixels)) - i_ref).max()
    print(f"HF CLIPModel: text embeds max abs {err_t:.2e}, image embeds {err_i:.2e}")
    assert err_t <= TOL and err_i <= TOL
    assert float(ours.logit_scale[...]) == pytest.approx(float(ref.logit_scale.detach()), abs=1e-6)

    # single towers from the same folder; the other tower's tensors are not reported as unexpected
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_clip_text(folder)
    assert np.abs(np.asarray(load_clip_text(folder).encode(ids)) - t_ref).max() <= TOL
    assert np.abs(np.asarray(load_clip_vision(folder).encode(pixels)) - i_ref).max() <= TOL


def test_hf_vision_with_projection_folder(tmp_path):
    torch.manual_seed(4)
    ref = transformers.CLIPVisionModelWithProjection(_vision_cfg(hidden_act="gelu"))
    folder = _save(ref, str(tmp_path / "vision"))
    ours = load_clip_vision(folder)
    pixels = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
    err = np.abs(np.asarray(ours.encode(pixels)) - want).max()
    print(f"HF CLIPVisionModelWithProjection max abs {err:.2e}")
    assert err <= TOL


# ---- OpenAI / open_clip layout ----------------------------------------------------------------------------------
def _open_clip_small(quick_gelu=True):
    import open_clip

    torch.manual_seed(5)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=VOCAB, width=64, heads=4, layers=2),
        quick_gelu=quick_gelu,
    ).eval()
    return model


def _state_np(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_openai_layout_safetensors_and_torch_file(tmp_path):
    ref = _open_clip_small()
    state = _state_np(ref)
    st_path = str(tmp_path / "clip.safetensors")
    save_file(state, st_path)
    pt_path = str(tmp_path / "clip.pt")
    torch.save(ref.state_dict(), pt_path)
    # OpenAI ships TorchScript archives: the module tree pickled, read here without torch too
    jit_path = str(tmp_path / "clip_jit.pt")
    example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
    torch.jit.trace(ref, example, strict=False, check_trace=False).save(jit_path)
    ids = _ids(eos=VOCAB - 1)  # EOS is the largest id, as in OpenAI's vocab
    pixels = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        t_ref = ref.encode_text(torch.from_numpy(ids).long()).numpy()
        i_ref = ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
    for path in (st_path, pt_path, jit_path):
        ours = load_clip(path)  # config inferred from shapes (heads = width // 64 is wrong here: pass it)
        assert ours.config.vision.num_layers == 2 and ours.config.text.max_positions == 77
    import dataclasses
    cfg = load_clip(st_path).config
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_heads=4),
                              vision=dataclasses.replace(cfg.vision, num_heads=4))
    for path in (st_path, pt_path, jit_path):
        ours = load_clip(path, cfg)
        err_t = np.abs(np.asarray(ours.encode_text(ids)) - t_ref).max()
        err_i = np.abs(np.asarray(ours.encode_image(pixels)) - i_ref).max()
        print(f"{os.path.basename(path)}: text {err_t:.2e}, image {err_i:.2e}")
        assert err_t <= TOL and err_i <= TOL
    # towers alone from the same file
    assert np.abs(np.asarray(load_clip_text(st_path, cfg.text).encode(ids)) - t_ref).max() <= TOL
    assert np.abs(np.asarray(load_clip_vision(st_path, cfg.vision).encode(pixels)) - i_ref).max() <= TOL


def test_loader_errors(tmp_path):
    ref = _open_clip_small()
    state = _state_np(ref)

    bad = dict(state)
    bad["visual.proj"] = np.zeros((64, 16), np.float32)
    p = str(tmp_path / "bad_shape.safetensors")
    save_file(bad, p)
    from posi_jax.models.clip import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
    cfg = CLIPConfig(
        text=CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                            projection_dim=32),
        vision=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_layers=2,
                                num_heads=4, projection_dim=32))
    with pytest.raises(PosiError, match=r"'visual\.proj' has shape \(64, 16\) but parameter "
                                        r"'vision_model\.visual_projection\.kernel' expects \(64, 32\)"):
        load_clip(p, cfg)

    missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
    p = str(tmp_path / "missing.safetensors")
    save_file(missing, p)
    with pytest.raises(PosiError, match=r"no tensor for parameter 'text_model\.final_layer_norm\.bias'"):
        load_clip(p, cfg)

    extra = dict(state)
    extra["some.extra.tensor"] = np.zeros(3, np.float32)
    p = str(tmp_path / "extra.safetensors")
    save_file(extra, p)
    with pytest.raises(PosiError, match=r"1 unexpected tensor\(s\) for this architecture: some\.extra\.tensor"):
        load_clip(p, cfg)

    p = str(tmp_path / "not_clip.safetensors")
    save_file({"foo": np.zeros(3, np.float32)}, p)
    with pytest.raises(PosiError, match="not an OpenAI/open_clip CLIP checkpoint"):
        load_clip(p)

    p = str(tmp_path / "garbage.safetensors")
    with open(p, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(PosiError, match="not a readable safetensors file"):
        load_clip(p)

    with pytest.raises(PosiError, match="text encoder folder not found"):
        load_clip_text_encoder(str(tmp_path / "nope"))

    folder = tmp_path / "wrong_arch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["UNet2DConditionModel"]}))
    save_file({"x": np.zeros(1, np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(PosiError, match="not a CLIP text model"):
        load_clip_text_encoder(str(folder))


def test_hf_text_encoder_shape_mismatch_names_tensor(tmp_path):
    torch.manual_seed(6)
    folder = _save(transformers.CLIPTextModel(_text_cfg()), str(tmp_path / "te"))
    state = load_file(os.path.join(folder, "model.safetensors"))
    key = next(k for k in state if k.endswith("encoder.layers.1.mlp.fc1.weight"))  # prefixed or not (transformers 5)
    state[key] = np.zeros((100, 64), np.float32)
    save_file(state, os.path.join(folder, "model.safetensors"))
    with pytest.raises(PosiError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight' has shape \(100, 64\) "
                                        r"but parameter 'encoder\.layers\.1\.mlp\.fc1\.kernel' expects \(64, 128\)"):
        load_clip_text_encoder(folder)
