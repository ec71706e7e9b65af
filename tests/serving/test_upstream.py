"""The images proxy against a loopback fake OpenAI images server: the rewrite (never the original prompt) goes
upstream and comes back as each image's `revised_prompt`; 429 / 500 / timeouts / dropped connections / malformed
replies are retried with backoff, then 502 (429: passed back with Retry-After); other 4xx are passed back as they
came; the caller's key is forwarded, else the server's own; no key ever reaches a log or a reply it does not belong to.
"""
from __future__ import annotations

import base64
import io
import logging

import pytest
from PIL import Image

from tests.serving.conftest import metric, start_service

pytestmark = pytest.mark.slow

SERVER_KEY = "sk-server-upstream-secret-1234"
CALLER_KEY = "sk-caller-own-secret-5678"
SERVICE_KEY = "posi-service-key-9012"


def _upstream(fake, **kwargs):
    from posi_jax.serving.upstream import UpstreamImages

    settings = dict(server_key=SERVER_KEY, timeout_s=0.5, max_retries=2, backoff_base_s=0.05, backoff_max_s=0.2)
    return lambda metrics: UpstreamImages(fake.base_url, metrics=metrics, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def proxy(tiny_rewriter, fake_images):
    service = start_service(tiny_rewriter, images=_upstream(fake_images), request_timeout_s=20)
    yield service
    service.server.stop()


@pytest.fixture
def fake(fake_images):
    fake_images.script({})
    fake_images.log.clear()
    fake_images.slow_s = 1.5
    yield fake_images
    fake_images.script({})


def _png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return im.size


def test_the_rewrite_goes_upstream_and_comes_back_as_revised_prompt(proxy, fake):
    with proxy.client() as c:
        r = c.post("/v1/images/generations", headers={"authorization": f"Bearer {CALLER_KEY}"},
                   json={"prompt": "a bloody knife", "n": 2, "size": "32x24", "model": "dall-e-2",
                         "response_format": "b64_json", "user": "someone"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and all(_png_size(d["b64_json"]) == (32, 24) for d in data)
    [sent] = fake.log
    assert sent["prompt"] == data[0]["revised_prompt"] == data[1]["revised_prompt"] != "a bloody knife"
    assert (sent["n"], sent["size"], sent["model"]) == (2, "32x24", "dall-e-2")
    assert sent["auth"] == f"Bearer {CALLER_KEY}"  # the caller's key passed through


def test_without_a_caller_key_the_servers_own_goes_upstream(proxy, fake):
    with proxy.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 200 and fake.log[0]["auth"] == f"Bearer {SERVER_KEY}"


@pytest.mark.parametrize("failure", ["429", "500", "slow", "drop", "malformed"])
def test_transient_upstream_failures_are_retried(proxy, fake, failure):
    fake.script({"": [failure, failure, "ok"]})
    with proxy.client() as c:
        before = c.get("/metrics").text
        r = c.post("/v1/images/generations", json={"prompt": "a cat"})
        after = c.get("/metrics").text
    assert r.status_code == 200, r.text
    assert [a["behaviour"] for a in fake.log] == [failure, failure, "ok"]
    kind = {"429": "http_429", "500": "http_500", "slow": "timeout", "drop": "connection",
            "malformed": "malformed"}[failure]
    assert metric(after, "posi_serve_upstream_errors_total", kind=kind) - \
        metric(before, "posi_serve_upstream_errors_total", kind=kind) == 2


@pytest.mark.parametrize("failure", ["500", "slow"])
def test_upstream_5xx_and_timeouts_become_502_after_the_retries(proxy, fake, failure):
    fake.script({"": [failure]})
    with proxy.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_error" and error["type"] == "server_error"
    assert ("http_500" if failure == "500" else "timeout") in error["message"]
    assert len(fake.log) == 3  # 1 + 2 retries


def test_upstream_rate_limit_is_passed_back_with_retry_after(proxy, fake):
    fake.script({"": ["429"]})
    with proxy.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and len(fake.log) == 3
    assert r.json()["error"]["code"] == "upstream_rate_limited"


def test_upstream_4xx_is_passed_back_as_it_came_without_retries(proxy, fake):
    fake.script({"": ["400"]})
    with proxy.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 400 and len(fake.log) == 1
    assert r.json()["error"]["code"] == "content_policy_violation"  # the upstream's own error object


def test_a_refused_key_is_the_callers_401_or_our_502_and_no_key_reaches_a_log(proxy, fake, caplog):
    fake.script({"": ["401echo"]})
    with caplog.at_level(logging.DEBUG):
        with proxy.client() as c:
            theirs = c.post("/v1/images/generations", headers={"authorization": f"Bearer {CALLER_KEY}"},
                            json={"prompt": "a cat"})
            ours = c.post("/v1/images/generations", json={"prompt": "a cat"})
            fake.script({"": ["500"]})
            failed = c.post("/v1/images/generations", headers={"authorization": f"Bearer {CALLER_KEY}"},
                            json={"prompt": "a dog"})
    assert theirs.status_code == 401 and CALLER_KEY in theirs.json()["error"]["message"]  # theirs, passed back
    assert ours.status_code == 502 and ours.json()["error"]["code"] == "upstream_auth"  # the server's to fix
    assert SERVER_KEY not in ours.text and "[API key redacted]" in ours.json()["error"]["message"]
    assert failed.status_code == 502 and len(fake.log) == 5 and "upstream" in caplog.text  # failures logged ...
    assert SERVER_KEY not in caplog.text and CALLER_KEY not in caplog.text  # ... without a key


def test_with_a_service_key_required_the_caller_header_stays_here(tiny_rewriter, fake):
    service = start_service(tiny_rewriter, images=_upstream(fake), api_key=SERVICE_KEY)
    try:
        with service.client() as c:
            none = c.post("/v1/images/generations", json={"prompt": "a cat"})
            wrong = c.post("/v1/rewrite", headers={"authorization": "Bearer nope"}, json={"prompts": ["a"]})
            assert fake.log == []
            ok = c.post("/v1/images/generations", headers={"authorization": f"Bearer {SERVICE_KEY}"},
                        json={"prompt": "a cat"})
            rewrite = c.post("/v1/rewrite", headers={"authorization": f"Bearer {SERVICE_KEY}"},
                             json={"prompts": ["a"]})
            open_routes = [c.get(p).status_code for p in ("/", "/healthz", "/metrics")]
    finally:
        service.server.stop()
    assert none.status_code == wrong.status_code == 401
    assert none.json()["error"]["code"] == "invalid_api_key"
    assert ok.status_code == 200 and rewrite.status_code == 200 and open_routes == [200, 200, 200]
    assert [a["auth"] for a in fake.log] == [f"Bearer {SERVER_KEY}"]  # never the service's key
