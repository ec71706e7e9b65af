"""NudeNet scorer (our onnxruntime + numpy implementation) vs nudenet's own NudeDetector on the same images:
preprocessing bit-exact, decoding + NMS identical on raw outputs, and end-to-end detections on image files."""
import sys

import numpy as np
import pytest
from PIL import Image

from posi_jax.errors import PosiError
from posi_jax.reward.nudenet import EXPOSED_LABELS, NUDENET_LABELS, NUDITY_LABELS, NudeNetScorer, resize_linear_uint8

nudenet = pytest.importorskip("nudenet")
cv2 = pytest.importorskip("cv2")
from nudenet import nudenet as nudenet_module  # noqa: E402


@pytest.fixture(scope="module")
def scorer():
    return NudeNetScorer()


def _shaded_figures() -> np.ndarray:
    """Two skin-toned shaded shapes on a blue background, drawn here; the detector fires on both
    (BUTTOCKS_EXPOSED ≈ 0.8 and BELLY_EXPOSED ≈ 0.8), so the comparison covers real detections."""
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)

    def blob(cx, cy, rx, ry):
        return np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))

    skin, bg = np.array([225, 175, 145], np.float32), np.array([60, 90, 120], np.float32)

    def figure(parts):
        body = np.zeros((512, 512), np.float32)
        shade = np.zeros((512, 512), np.float32)
        for cx, cy, rx, ry, w in parts:
            b = blob(cx, cy, rx, ry)
            if w == 1.0:
                body = np.maximum(body, (b > 0.3).astype(np.float32))
            shade += w * b
        return bg * (1 - body[..., None]) + body[..., None] * skin * (0.75 + 0.35 * np.clip(shade, 0, 1))[..., None]

    torso = figure([(256, 420, 170, 260, 1.0), (200, 300, 55, 50, 0.25), (312, 300, 55, 50, 0.25)])
    for cx in (200, 312):
        n = blob(cx, 310, 9, 9)[..., None]
        torso = torso * (1 - n) + n * np.array([160, 90, 80], np.float32)
    hips = figure([(190, 300, 90, 120, 1.0), (322, 300, 90, 120, 1.0)]) * (1 - 0.6 * blob(256, 300, 6, 140)[..., None])
    return np.clip(np.stack([torso, hips]), 0, 255).astype(np.uint8)


def _test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    solid = [np.full((512, 512, 3), c, np.uint8) for c in ((0, 0, 0), (255, 255, 255), (225, 175, 145))]
    noise = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), rng.integers(0, 256, (400, 640, 3), dtype=np.uint8)]
    figures = list(_shaded_figures())
    wide = np.concatenate([figures[1][:, :, :], np.full((512, 256, 3), 60, np.uint8)], axis=1)  # 512x768: padded
    return solid + noise + figures + [wide]


def test_resize_matches_opencv():
    rng = np.random.default_rng(1)
    for h, w in [(512, 512), (768, 768), (640, 640), (400, 400)]:  # downscaling: bit-exact
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resize_linear_uint8(img, 320), cv2.resize(img, (320, 320)))
    img = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)  # upscaling: within one grey level
    assert np.abs(resize_linear_uint8(img, 320).astype(int) - cv2.resize(img, (320, 320))).max() <= 1


def test_preprocess_matches_nudenet(scorer):
    for img in _test_images():
        blob = nudenet_module._read_image(np.ascontiguousarray(img[..., ::-1]), 320)[0]  # nudenet takes BGR arrays
        np.testing.assert_array_equal(scorer.preprocess(img)[None], blob)


def test_decode_and_nms_match_nudenet_on_raw_outputs():
    """Random raw outputs with many overlapping candidates of mixed classes: identical detections."""
    rng = np.random.default_rng(2)
    for trial, (h, w) in enumerate([(512, 512), (512, 768), (300, 200)]):
        raw = np.zeros((22, 2100), np.float32)
        raw[0:2] = rng.uniform(0, 320, (2, 2100))
        raw[2:4] = rng.uniform(5, 200, (2, 2100))
        raw[4:] = rng.uniform(0, 1, (18, 2100)) ** 500  # most rows below 0.2: about a hundred candidates
        raw[4 + rng.integers(0, 18, 30), rng.integers(0, 2100, 30)] = 0.3  # ties
        want = nudenet_module._postprocess([raw[None]], max(h, w) - w, max(h, w) - h, 0, 0, w, h, 320, 320)
        got = NudeNetScorer.decode(raw, h, w)
        assert len(got) > 5
        assert [(d.label, d.score, list(d.box)) for d in got] == [(d["class"], d["score"], d["box"]) for d in want]


def test_end_to_end_matches_nude_detector(scorer, tmp_path):
    images = _test_images()
    reference = nudenet.NudeDetector()
    ours = scorer.detect(images)
    found = 0
    for i, (img, dets) in enumerate(zip(images, ours)):
        path = str(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(path)
        want = reference.detect(path)
        assert [(d.label, list(d.box)) for d in dets] == [(d["class"], d["box"]) for d in want], i
        np.testing.assert_allclose([d.score for d in dets], [d["score"] for d in want], atol=1e-5)
        found += len(dets)
    assert found >= 2  # the drawn figures are detected
    scores = scorer.score(images[:7])  # a list: the 400x640 noise image has another size
    assert scores.shape == (7,) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[:5].tolist() == [0.0] * 5  # solid colours and noise: nothing exposed
    # default labels (I2P nudity): the hips count, the torso's BELLY_EXPOSED does not
    assert scores[5] == 0.0 and scores[6] == pytest.approx(max(d.score for d in ours[6]))
    assert scorer.exposed_classes(images[5:7]) == [[], ["BUTTOCKS_EXPOSED"]]
    every_exposed = NudeNetScorer(labels=EXPOSED_LABELS)
    assert every_exposed.score(images[5:7]).min() > 0.5
    assert every_exposed.exposed_classes(images[5:7]) == [["BELLY_EXPOSED"], ["BUTTOCKS_EXPOSED"]]
    assert set(NUDITY_LABELS) < set(EXPOSED_LABELS) < set(NUDENET_LABELS) and len(EXPOSED_LABELS) == 9


def test_bad_inputs(scorer, monkeypatch):
    with pytest.raises(PosiError, match=r"\[N, H, W, 3\] RGB, got shape \(64, 64, 3\)"):
        scorer.score(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(PosiError, match="must be uint8"):
        scorer.score(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(PosiError, match="unknown label"):
        NudeNetScorer(labels=("NOT_A_LABEL",))
    with pytest.raises(PosiError, match="NudeNet model not found"):
        NudeNetScorer(model_path="/nonexistent/320n.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(PosiError, match="needs onnxruntime"):
        NudeNetScorer()
