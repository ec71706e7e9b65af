"""CLIP towers vs open_clip (torch) with the same random weights: ViT-B/32- and ViT-L/14-shaped small configs
(same patch sizes and structure, few layers, small widths), both activations; full-size presets checked abstractly."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from posi_jax.models.clip_tokenizer import CLIPTokenizer
from posi_jax.errors import PosiError
from posi_jax.models.clip import (
    CLIP_VIT_B32,
    CLIP_VIT_L14,
    SD2_OPENCLIP_VIT_H_TEXT,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextTransformer,
    CLIPVisionConfig,
)
from posi_jax.weights.clip import OPENAI_TABLE, clip_rules
from posi_jax.weights.common import fill_abstract, map_checkpoint

TOL = 1e-4
PROMPTS = ["a photo of a cat", "an oil painting of a ship in a storm, dramatic lighting",
           "word " * 90, "Ünïcode ✓ and 12345"]

# (name, open_clip kwargs, our config): small versions of the two shapes POSI uses
SMALL = {
    "B32": (
        dict(embed_dim=48, vision_cfg=dict(image_size=64, patch_size=32, width=96, layers=2, head_width=32),
             text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)),
        CLIPConfig(
            text=CLIPTextConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, projection_dim=48),
            vision=CLIPVisionConfig(image_size=64, patch_size=32, hidden_size=96, intermediate_size=384,
                                    num_layers=2, num_heads=3, projection_dim=48)),
    ),
    "L14": (
        dict(embed_dim=64, vision_cfg=dict(image_size=56, patch_size=14, width=128, layers=3, head_width=32),
             text_cfg=dict(context_length=77, vocab_size=49408, width=96, heads=6, layers=3)),
        CLIPConfig(
            text=CLIPTextConfig(hidden_size=96, intermediate_size=384, num_layers=3, num_heads=6, projection_dim=64),
            vision=CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=128, intermediate_size=512,
                                    num_layers=3, num_heads=4, projection_dim=64)),
    ),
}


def _with_act(cfg: CLIPConfig, act: str) -> CLIPConfig:
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_act=act),
                               vision=dataclasses.replace(cfg.vision, hidden_act=act))


def _pair(name: str, act: str, seed: int = 0):
    import open_clip

    oc_kwargs, cfg = SMALL[name]
    torch.manual_seed(seed)
    ref = open_clip.model.CLIP(**oc_kwargs, quick_gelu=(act == "quick_gelu")).eval()
    # open_clip initialises biases / LayerNorms to 0 / 1: randomise everything so each tensor's mapping is tested
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg = _with_act(cfg, act)
    ours = fill_abstract(nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0))), state.__getitem__, state.keys(),
                         clip_rules(OPENAI_TABLE, "model"), name)
    return ref, ours


@pytest.mark.parametrize("name,act", [("B32", "quick_gelu"), ("L14", "quick_gelu"), ("L14", "gelu")])
def test_parity_with_open_clip(name, act):
    import open_clip

    ref, ours = _pair(name, act)
    ids = CLIPTokenizer.from_open_clip()(PROMPTS)
    np.testing.assert_array_equal(ids, open_clip.tokenize(PROMPTS).numpy())
    size = ours.config.vision.image_size
    pixels = np.random.default_rng(0).standard_normal((3, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        t_ref = ref.encode_text(torch.from_numpy(ids).long()).numpy()
        i_ref = ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
    t_ours = np.asarray(jax.jit(lambda m, x: m.encode_text(x))(ours, ids))
    i_ours = np.asarray(jax.jit(lambda m, x: m.encode_image(x))(ours, pixels))
    err_t, err_i = np.abs(t_ours - t_ref).max(), np.abs(i_ours - i_ref).max()
    print(f"{name}/{act}: text embeds max abs {err_t:.2e} (scale {np.abs(t_ref).max():.2f}), "
          f"image embeds {err_i:.2e} (scale {np.abs(i_ref).max():.2f})")
    assert err_t <= TOL and err_i <= TOL
    assert float(ours.logit_scale[...]) == pytest.approx(float(ref.logit_scale.detach()), abs=1e-6)


def test_activation_setting_matters():
    _, ours_q = _pair("B32", "quick_gelu")
    _, ours_g = _pair("B32", "gelu")
    ids = CLIPTokenizer.from_open_clip()(PROMPTS[:1])
    assert np.abs(np.asarray(ours_q.encode_text(ids)) - np.asarray(ours_g.encode_text(ids))).max() > 1e-4


def test_skip_last_layers_is_penultimate_then_final_ln():
    """SD v2's text conditioning: run all but the last layer, then ln_final (as LDM's FrozenOpenCLIPEmbedder)."""
    ref, ours = _pair("L14", "gelu")
    ids = CLIPTokenizer.from_open_clip()(PROMPTS)
    text_cfg = dataclasses.replace(ours.config.text, skip_last_layers=1)
    skip = CLIPTextTransformer(text_cfg, rngs=nnx.Rngs(0))
    nnx.update(skip, nnx.state(ours.text_model))
    with torch.no_grad():
        x = ref.token_embedding(torch.from_numpy(ids).long()) + ref.positional_embedding
        for block in ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=ref.attn_mask)
        want = ref.ln_final(x).numpy()
    hidden, pooled = skip(ids)
    err = np.abs(np.asarray(hidden) - want).max()
    print(f"penultimate layer + ln_final max abs {err:.2e}")
    assert err <= TOL
    eot = ids.argmax(-1)
    np.testing.assert_allclose(np.asarray(pooled), want[np.arange(len(ids)), eot], atol=TOL)


def test_eos_token_id_pooling():
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         max_positions=8, projection_dim=None)
    model = CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
    ids = np.array([[1, 5, 7, 3, 40, 40, 40, 40]], np.int32)  # id 3 is EOS; 40 (padding) is the largest id
    hidden, pooled_argmax = model(ids)
    np.testing.assert_allclose(np.asarray(pooled_argmax), np.asarray(hidden)[:, 4])  # argmax: first 40
    eos_model = CLIPTextTransformer(dataclasses.replace(cfg, eos_token_id=3), rngs=nnx.Rngs(0))
    hidden, pooled_eos = eos_model(ids)
    np.testing.assert_allclose(np.asarray(pooled_eos), np.asarray(hidden)[:, 3])


def test_causal_mask():
    """Changing a later token must not change earlier hidden states."""
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         max_positions=8, projection_dim=None)
    model = CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
    a = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    b = a.copy()
    b[0, 5] = 30
    ha, hb = np.asarray(model(a)[0]), np.asarray(model(b)[0])
    np.testing.assert_allclose(ha[:, :5], hb[:, :5], atol=1e-6)
    assert np.abs(ha[:, 5:] - hb[:, 5:]).max() > 1e-3


def test_bf16_compute_close_to_fp32():
    _, ours = _pair("B32", "quick_gelu")
    cfg = ours.config
    bf = nnx.eval_shape(lambda: CLIPModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    nnx.update(bf, nnx.state(ours))
    pixels = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    a = np.asarray(ours.encode_image(pixels))
    b = np.asarray(bf.encode_image(pixels).astype(jnp.float32))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


@pytest.mark.parametrize("oc_name,cfg", [("ViT-B-32-quickgelu", CLIP_VIT_B32), ("ViT-L-14", CLIP_VIT_L14)])
def test_full_size_presets_match_open_clip_layout(oc_name, cfg):
    """Every full-size open_clip tensor maps onto a preset parameter of the same shape, with nothing left over
    (meta tensors, zero-stride numpy views and eval_shape: almost no memory)."""
    import open_clip

    with torch.device("meta"):
        ref = open_clip.model.CLIP(**open_clip.get_model_config(oc_name))
    state = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in ref.state_dict().items()}
    mapped, unmapped = map_checkpoint(state.keys(), clip_rules(OPENAI_TABLE, "model"), oc_name)
    assert unmapped == []
    abstract = nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
    shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    mapped_shapes = {}
    for path, (key, rule) in mapped.items():
        array = state[key][(slice(None),) * state[key].ndim]  # the transform only needs shape and strides
        mapped_shapes[path] = (rule.transform(array) if rule.transform else array).shape
    assert shapes == mapped_shapes
    assert sum(np.prod(s) for s in shapes.values()) == sum(p.numel() for p in ref.parameters())


def test_sd2_text_preset_shapes():
    model = nnx.eval_shape(lambda: CLIPTextTransformer(SD2_OPENCLIP_VIT_H_TEXT, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    hidden, pooled = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids), state,
                                    jax.ShapeDtypeStruct((2, 77), jnp.int32))
    assert hidden.shape == (2, 77, 1024) and pooled.shape == (2, 1024)
    assert len(model.encoder.layers) == 24


def test_bad_inputs():
    _, ours = _pair("B32", "quick_gelu")
    with pytest.raises(PosiError, match=r"expected images \[N, 64, 64, 3\], got \(2, 3, 64, 64\)"):
        ours.encode_image(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(PosiError, match="78 tokens exceed max_positions 77"):
        ours.encode_text(np.zeros((1, 78), np.int32))
    with pytest.raises(PosiError, match="hidden_act 'relu'"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(PosiError, match="skip_last_layers"):
        CLIPTextConfig(num_layers=2, skip_last_layers=2)
