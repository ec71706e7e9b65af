"""UNet2DConditionModel parity with diffusers (torch, fp32): identical random weights loaded through our loader from
a diffusers folder, SD v1-style (conv projections, one head count) and SD v2-style (linear projections, per-block
head counts). Tolerance: max abs error <= 1e-4 * max|reference|."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.unet import UNet2DConditionModel, UNetConfig, timestep_embedding
from posi_jax.weights.sd import load_unet
from tests.conftest import max_abs

REL_TOL = 1e-4


@nnx.jit
def _forward(model, sample, t, context):
    return model(sample, t, context)


def _reference(folder):
    from diffusers import UNet2DConditionModel as TorchUNet

    return TorchUNet.from_pretrained(str(folder), subfolder="unet").eval()


def _inputs(size, batch=2, seed=0, ctx_dim=32):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 77, ctx_dim)).astype(np.float32)
    return sample, context


def _compare(folder, size, timesteps, batch=2):
    ours, ref = load_unet(folder), _reference(folder)
    sample, context = _inputs(size, batch)
    with torch.no_grad():
        want = ref(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.as_tensor(timesteps),
                   torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(_forward(ours, jnp.asarray(sample), jnp.asarray(timesteps), jnp.asarray(context)))
    err, scale = max_abs(got, want), float(np.abs(want).max())
    print(f"UNet {folder.name} {size}x{size} t={timesteps}: max abs err {err:.2e}, output scale {scale:.3f}")
    assert got.shape == want.shape
    assert err <= REL_TOL * scale
    return ours


def test_unet_v1_conv_projection_matches_diffusers(tiny_sd_folder):
    # integer-valued and fractional timesteps in one batch (one compilation)
    _compare(tiny_sd_folder, 8, np.array([999, 17, 500.5, 0.25], np.float32), batch=4)


def test_unet_v2_linear_projection_per_block_heads_matches_diffusers(tiny_sd2_folder):
    ours = _compare(tiny_sd2_folder, 8, np.array([1, 640]))
    assert ours.cfg.heads_per_block == (2, 4, 8)
    # per-block head counts reach the attention layers (down block i, mid = last, up blocks reversed)
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.down_blocks[:2]] == [2, 4]
    assert ours.mid_block.attentions[0].transformer_blocks[0].attn2.heads == 8
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in ours.up_blocks[1:]] == [4, 2]


def test_unet_long_sequence_blockwise_attention_matches_diffusers(tiny_sd_folder):
    """32x32 latents: 1024 tokens at the top level, where dot_product_attention switches to the blockwise path."""
    _compare(tiny_sd_folder, 32, np.array([250], np.float32), batch=1)


def _random_model(factory, seed=0):
    """Materialise an nnx.eval_shape model with numpy random weights (jax.random init compiles slowly on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)
    leaves = [(p, v.replace(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype)))
              for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def test_scalar_timestep_broadcasts_over_the_batch():
    cfg = UNetConfig(block_out_channels=(8,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                     norm_num_groups=4, layers_per_block=1, attention_head_dim=1, cross_attention_dim=8)
    unet = _random_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))

    @nnx.jit
    def scalar_and_vector(unet, sample, context):  # both calls in one compilation
        return unet(sample, jnp.asarray(321), context), unet(sample, jnp.asarray([321, 321]), context)

    a, b = scalar_and_vector(unet, jnp.ones((2, 4, 4, 4)).at[1].set(-1.0), jnp.zeros((2, 3, 8)))
    assert a.shape == (2, 4, 4, 4) and max_abs(a, b) == 0.0


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 500, 999], np.float32)
    want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip, shift))
    # sin/cos of arguments t * freq up to 999 rad, whose fp32 spacing is 6e-5: a one-ulp difference in exp(freq)
    # between XLA and torch moves them by that much
    assert max_abs(got, want) <= 1e-4


def test_sd14_config_shapes_and_param_count():
    """The SD v1.4 preset builds abstractly (no memory) with diffusers' 859.52M parameters and the right shapes."""
    cfg = UNetConfig(attention_head_dim=8)
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == 859_520_964
    out = jax.eval_shape(lambda m, x, t, c: m(x, t, c), abstract, jax.ShapeDtypeStruct((2, 64, 64, 4), jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2, 77, 768), jnp.float32))
    assert out.shape == (2, 64, 64, 4)


def test_unsupported_and_unknown_config_options_are_errors():
    base = dataclasses.asdict(UNetConfig())
    with pytest.raises(PosiError, match="class_embed_type"):
        UNetConfig.from_diffusers(dict(base, class_embed_type="timestep"), "unet/config.json")
    with pytest.raises(PosiError, match="unknown UNet config key 'frobnicate'"):
        UNetConfig.from_diffusers(dict(base, frobnicate=1), "unet/config.json")
    with pytest.raises(PosiError, match="unsupported block type 'SimpleCrossAttnDownBlock2D'"):
        UNetConfig.from_diffusers(dict(base, down_block_types=["SimpleCrossAttnDownBlock2D"] * 4))
    with pytest.raises(PosiError, match="attention_head_dim has 3 entries for 4 down blocks"):
        UNetConfig.from_diffusers(dict(base, attention_head_dim=[5, 10, 20]))
    with pytest.raises(PosiError, match="not a multiple of 8"):
        cfg = UNetConfig(block_out_channels=(32, 32, 32, 32), norm_num_groups=8, attention_head_dim=2,
                         cross_attention_dim=16)
        jax.eval_shape(lambda m, x: m(x, 1, jnp.zeros((1, 77, 16))),
                       nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))),
                       jax.ShapeDtypeStruct((1, 12, 12, 4), jnp.float32))
