"""AutoencoderKL parity with diffusers (torch, fp32), identical random weights loaded through our loader:
decode (incl. a 1024-token mid-block attention that takes the blockwise path) and encode (mean and logvar).
Tolerance: max abs error <= 1e-4 * max|reference|."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from posi_jax.errors import PosiError
from posi_jax.models.vae import VAEConfig
from posi_jax.weights.sd import load_vae
from tests.conftest import max_abs

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def vaes(tiny_sd_folder):
    from diffusers import AutoencoderKL as TorchVAE

    return load_vae(tiny_sd_folder), TorchVAE.from_pretrained(str(tiny_sd_folder), subfolder="vae").eval()


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def test_vae_decode_matches_diffusers(vaes):
    """32x32 latents: the mid-block attention sees 1024 tokens and takes the blockwise path."""
    ours, ref = vaes
    size = 32
    z = np.random.default_rng(size).standard_normal((2, size, size, 4)).astype(np.float32)
    with torch.no_grad():
        want = _nhwc(ref.decode(_nchw(z)).sample)
    got = np.asarray(nnx.jit(lambda m, x: m.decode(x))(ours, jnp.asarray(z)))
    err, scale = max_abs(got, want), float(np.abs(want).max())
    print(f"VAE decode {size}x{size} latents -> {got.shape[1]}px: max abs err {err:.2e}, output scale {scale:.3f}")
    assert got.shape == want.shape == (2, 2 * size, 2 * size, 3)
    assert err <= REL_TOL * scale


def test_vae_encode_matches_diffusers(vaes):
    ours, ref = vaes
    images = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(_nchw(images)).latent_dist
    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(ours, jnp.asarray(images))
    for name, got, want in (("mean", mean, _nhwc(dist.mean)), ("logvar", logvar, _nhwc(dist.logvar))):
        err, scale = max_abs(got, want), float(np.abs(want).max())
        print(f"VAE encode {name}: max abs err {err:.2e}, scale {scale:.3f}")
        assert np.shape(got) == want.shape == (2, 16, 16, 4)
        assert err <= REL_TOL * scale
    assert ours.scaling_factor == ref.config.scaling_factor == 0.18215
    assert ours.cfg.scale_factor == 2  # two blocks: one downsampling


def test_vae_config_errors():
    with pytest.raises(PosiError, match="unsupported AutoencoderKL option up_block_types"):
        VAEConfig.from_diffusers({"block_out_channels": [16, 32], "up_block_types": ["UpDecoderBlock2D", "Up2"]})
    with pytest.raises(PosiError, match="unknown AutoencoderKL config key 'spam'"):
        VAEConfig.from_diffusers({"spam": 1})
    assert VAEConfig.from_diffusers({"scaling_factor": 0.13025, "_class_name": "AutoencoderKL"}).scaling_factor == 0.13025
