"""CLIP preprocessing in JAX vs open_clip's preprocess (PIL bicubic resize, center crop, normalise) of the same image."""
import jax
import numpy as np
import pytest
from PIL import Image

from posi_jax.errors import PosiError
from posi_jax.reward.preprocess import CLIP_STD, clip_preprocess, resized_size

STD = np.asarray(CLIP_STD, np.float32)


def _images(h, w, seed):
    """A noise image (worst case for resampling) and a smooth one with noise on top."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 17.0 + c) * np.cos(yy / 23.0) for c in range(3)], -1)
    smooth = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return np.stack([noise, smooth])


def _open_clip_reference(batch):
    import open_clip

    pre = open_clip.image_transform(224, is_train=False)
    return np.stack([pre(Image.fromarray(img)).numpy().transpose(1, 2, 0) for img in batch])


@pytest.mark.parametrize("h,w", [(512, 512), (480, 640), (768, 512), (100, 150), (300, 224), (224, 224)])
def test_matches_open_clip_preprocess(h, w):
    batch = _images(h, w, seed=h + w)
    ref = _open_clip_reference(batch)
    ours = np.asarray(jax.jit(clip_preprocess)(batch))
    assert ours.shape == (2, 224, 224, 3) and ours.dtype == np.float32
    err = np.abs(ours - ref) * STD * 255.0  # back to grey levels
    print(f"{h}x{w}: max error {err.max():.3f}/255, pixels off by >0.5/255: {(err > 0.5).mean():.5f}")
    assert err.max() <= 1.0 + 1e-3
    assert (err > 0.5).mean() < 0.005  # off-by-one levels are rare (fixed-point vs float weights)
    if (h, w) in [(224, 224), (300, 224)]:  # no resampling at all: exact
        assert err.max() < 1e-3


def test_float_input_like_diffusers_numpy_to_pil():
    batch = _images(512, 512, seed=0)
    as_float = batch.astype(np.float32) / 255.0  # round(x * 255) recovers the uint8 image
    np.testing.assert_array_equal(np.asarray(clip_preprocess(as_float)), np.asarray(clip_preprocess(batch)))


def test_resized_size_like_torchvision():
    assert resized_size(512, 512, 224) == (224, 224)
    assert resized_size(480, 640, 224) == (224, 298)
    assert resized_size(1000, 333, 224) == (672, 224)


def test_bad_inputs():
    with pytest.raises(PosiError, match=r"\[N, H, W, 3\], got shape \(512, 512, 3\)"):
        clip_preprocess(np.zeros((512, 512, 3), np.uint8))
    with pytest.raises(PosiError, match=r"got shape \(1, 3, 64, 64\)"):
        clip_preprocess(np.zeros((1, 3, 64, 64), np.uint8))
    with pytest.raises(PosiError, match="uint8 or float, got int32"):
        clip_preprocess(np.zeros((1, 64, 64, 3), np.int32))
    with pytest.raises(PosiError, match="uint8 or float, got bool"):
        clip_preprocess(np.zeros((1, 64, 64, 3), bool))
