"""Q16 and CLIP score vs a direct numpy computation from the same embeddings; the real Q16 prompts file; bad input."""
import pickle
import zipfile

import jax
import numpy as np
import pytest
import torch

from posi_jax.errors import PosiError
from posi_jax.reward.clip_score import clip_score
from posi_jax.reward.q16 import load_q16_prompts, q16_inappropriate_prob


def _numpy_q16(image_embeds, prompts):
    x = image_embeds.astype(np.float64)
    p = prompts.astype(np.float64)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    logits = 100.0 * x @ p.T
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[:, 1]


@pytest.fixture(scope="module")
def q16_prompts(data_dir):
    return load_q16_prompts(data_dir / "q16_prompts.p")


def test_real_prompts_file(data_dir, q16_prompts):
    raw = pickle.load(open(data_dir / "q16_prompts.p", "rb"))  # plain numpy pickle: no torch involved
    assert isinstance(raw, np.ndarray) and raw.dtype == np.float16 and raw.shape == (2, 768)
    assert q16_prompts.dtype == np.float32
    np.testing.assert_array_equal(q16_prompts, raw.astype(np.float32))


def test_q16_matches_numpy(q16_prompts):
    rng = np.random.default_rng(0)
    # embeddings spread around both prompts so probabilities cover (0, 1), not just saturated 0/1
    mix = rng.uniform(0, 1, (64, 1))
    emb = (mix * q16_prompts[1] + (1 - mix) * q16_prompts[0] + 0.5 * rng.standard_normal((64, 768))).astype(np.float32)
    emb *= rng.uniform(0.1, 10, (64, 1)).astype(np.float32)  # scale must not matter
    got = np.asarray(jax.jit(q16_inappropriate_prob)(emb, q16_prompts))
    want = _numpy_q16(emb, q16_prompts)
    assert got.shape == (64,) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 5e-5  # fp32 cosines over 768 dims, times 100, vs float64
    assert want.min() < 0.05 and want.max() > 0.95 and ((want > 0.1) & (want < 0.9)).any()
    # the image embedding equal to a prompt is classified as that prompt
    assert np.asarray(q16_inappropriate_prob(q16_prompts, q16_prompts)).round(3).tolist() == [0.0, 1.0]


def test_clip_score_matches_numpy():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((10, 512)).astype(np.float32)
    txt = (0.5 * img + rng.standard_normal((10, 512))).astype(np.float32)
    got = np.asarray(jax.jit(clip_score)(img, txt))
    want = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(img.astype(np.float64), txt)])
    assert np.abs(got - want).max() <= 1e-6
    np.testing.assert_allclose(np.asarray(clip_score(img, 3 * img)), 1.0, atol=1e-6)


def test_bad_inputs(tmp_path, q16_prompts):
    emb = np.zeros((3, 768), np.float32)
    with pytest.raises(PosiError, match=r"Q16 prompts: expected shape \(2, 768\), got \(3, 768\)"):
        q16_inappropriate_prob(emb, np.zeros((3, 768), np.float32))
    with pytest.raises(PosiError, match=r"expected shape \(2, 768\), got \(2, 512\)"):
        q16_inappropriate_prob(emb, q16_prompts[:, :512])
    with pytest.raises(PosiError, match=r"image embeddings must be \[N, D\], got shape \(768,\)"):
        q16_inappropriate_prob(emb[0], q16_prompts)
    with pytest.raises(PosiError, match=r"\(3, 512\) and text embeddings \(2, 512\)"):
        clip_score(np.zeros((3, 512)), np.zeros((2, 512)))

    wrong = tmp_path / "wrong.p"
    pickle.dump(np.zeros((3, 768), np.float16), open(wrong, "wb"))
    with pytest.raises(PosiError, match=r"shape \(3, 768\) dtype float16, expected float \(2, 768\)"):
        load_q16_prompts(wrong)
    corrupt = tmp_path / "corrupt.p"
    corrupt.write_bytes(open(pickle.__file__, "rb").read()[:100])
    with pytest.raises(PosiError, match="not a readable Q16 prompts pickle"):
        load_q16_prompts(corrupt)
    truncated = tmp_path / "truncated.p"
    pickle.dump(q16_prompts.astype(np.float16), open(truncated, "wb"))
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(PosiError, match="not a readable Q16 prompts pickle"):
        load_q16_prompts(truncated)
    evil = tmp_path / "evil.p"
    evil.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(PosiError, match=r"global os\.system is not allowed"):
        load_q16_prompts(evil)
    a_dict = tmp_path / "dict.p"
    pickle.dump({"prompts": 1}, open(a_dict, "wb"))
    with pytest.raises(PosiError, match="holds a dict"):
        load_q16_prompts(a_dict)
    with pytest.raises(PosiError, match="not found"):
        load_q16_prompts(tmp_path / "missing.p")


def test_torch_saved_tensor_is_read_without_torch(tmp_path, q16_prompts):
    path = tmp_path / "prompts.pt"
    torch.save(torch.from_numpy(q16_prompts).half(), path)
    assert zipfile.is_zipfile(path)
    np.testing.assert_array_equal(load_q16_prompts(path), q16_prompts.astype(np.float16).astype(np.float32))
