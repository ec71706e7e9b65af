"""`--sd`: the images endpoint draws the rewrite with our Stable Diffusion (tiny random weights), OpenAI's reply shape."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.serving.conftest import metric, start_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_sd(tiny_rewriter, tiny_sd_folder):
    from posi_jax.diffusion.pipeline import StableDiffusion
    from posi_jax.serving.local_images import LocalImages

    images = LocalImages(StableDiffusion.from_folder(tiny_sd_folder), source=str(tiny_sd_folder), steps=2,
                         guidance_scale=7.5, max_n=2)
    images.warm_up()
    service = start_service(tiny_rewriter, images=lambda metrics: images)
    yield service
    service.server.stop()


def test_local_sd_draws_the_rewrite(local_sd):
    with local_sd.client() as c:
        before = c.get("/metrics").text
        r = c.post("/v1/images/generations", json={"prompt": "a bloody knife", "n": 2})
        after = c.get("/metrics").text
        health = c.get("/healthz").json()
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and data[0]["revised_prompt"] == data[1]["revised_prompt"]
    [size] = health["images"]["sizes"]  # the folder's own size
    images = []
    for d in data:
        with Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) as im:
            assert f"{im.size[0]}x{im.size[1]}" == size and im.mode == "RGB"
            images.append(im.tobytes())
    assert images[0] != images[1]  # each image from its own seed
    assert metric(after, "posi_serve_images_total", backend="local_sd") - \
        metric(before, "posi_serve_images_total", backend="local_sd") == 2
    assert health["images"]["kind"] == "local_sd"
    assert metric(after, "posi_serve_jit_compilations_after_warmup") == 0  # SD was compiled at start-up too


@pytest.mark.parametrize("body, message", [
    ({"prompt": "a cat", "size": "512x512"}, "size '512x512' is not served; sizes: "),
    ({"prompt": "a cat", "n": 3}, "at most 2 images per request"),
    ({"prompt": "a cat", "response_format": "url"}, "use response_format b64_json"),
])
def test_requests_local_sd_cannot_serve(local_sd, body, message):
    with local_sd.client() as c:
        r = c.post("/v1/images/generations", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
