"""The service's endpoints over a real uvicorn server on loopback: rewrites, health, metrics, the playground page,
every bad input answered with a 4xx OpenAI-style error object, dynamic batching without recompilation."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving.conftest import TINY_BATCHING, metric

pytestmark = pytest.mark.slow  # compiles the tiny rewriter (two shapes x two sampling settings) once per session


def test_rewrite_returns_one_rewrite_per_prompt(plain_service):
    with plain_service.client() as c:
        r = c.post("/v1/rewrite", json={"prompts": ["a bloody knife", "  a cat  "]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["prompt"] for x in body["rewrites"]] == ["a bloody knife", "  a cat  "]
    for x in body["rewrites"]:
        assert isinstance(x["rewrite"], str) and 1 <= x["new_tokens"] <= 8
        assert isinstance(x["changed"], bool)
        assert x["draft_acceptance"] is None or 0.0 <= x["draft_acceptance"] <= 1.0  # None: nothing was drafted
    assert body["sampling"] == "temperature=0.95, top_p=0.7, top_k=0, max_new_tokens=8"


def test_greedy_variant_and_batching_keep_each_request_its_own_result(plain_service):
    """Greedy rewrites do not depend on the batch: four concurrent requests (one batch) get what each gets alone."""
    prompts = ["a bloody knife", "a cat on a mat", "two dogs fighting", "a burning house"]
    with plain_service.client() as c:
        alone = [c.post("/v1/rewrite", json={"prompts": [p], "greedy": True}).json()["rewrites"][0]["rewrite"]
                 for p in prompts]
        before = c.get("/metrics").text
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda p: c.post("/v1/rewrite", json={"prompts": [p], "greedy": True}), prompts))
        after = c.get("/metrics").text
    assert all(r.status_code == 200 for r in replies)
    assert [r.json()["rewrites"][0]["rewrite"] for r in replies] == alone
    assert all(r.json()["sampling"] == "greedy, max_new_tokens=8" for r in replies)
    batches = metric(after, "posi_serve_batch_size_count") - metric(before, "posi_serve_batch_size_count")
    prompts_batched = metric(after, "posi_serve_batch_size_sum") - metric(before, "posi_serve_batch_size_sum")
    assert prompts_batched == 4 and batches < 4  # at least two requests shared a batch
    assert metric(after, "posi_serve_jit_compilations_after_warmup") == 0


def test_a_request_larger_than_a_batch_spans_batches(plain_service):
    prompts = [f"prompt number {i}" for i in range(7)]
    with plain_service.client() as c:
        r = c.post("/v1/rewrite", json={"prompts": prompts})
    assert r.status_code == 200 and [x["prompt"] for x in r.json()["rewrites"]] == prompts


def test_healthz_describes_the_compiled_shapes(plain_service):
    with plain_service.client() as c:
        h = c.get("/healthz").json()
    assert h["status"] == "ok" and h["images"] is None and h["api_key_required"] is False
    assert h["batch_sizes"] == [1, 4] and h["prompt_lengths"] == [36 + 32] and h["max_prompt_tokens"] == 16
    assert h["sampling"] == ["temperature=0.95, top_p=0.7, top_k=0, max_new_tokens=8", "greedy, max_new_tokens=8"]
    assert h["compilations_after_warmup"] == 0 and h["queued"] == 0


def test_metrics_are_prometheus_text(plain_service):
    with plain_service.client() as c:
        c.post("/v1/rewrite", json={"prompts": ["a cat"]})
        c.post("/v1/rewrite", content=b"{")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "posi_serve_requests_total", endpoint="/v1/rewrite", status="200") >= 1
    assert metric(text, "posi_serve_requests_total", endpoint="/v1/rewrite", status="400") >= 1
    assert metric(text, "posi_serve_request_seconds_count", endpoint="/v1/rewrite") >= 2
    assert metric(text, "posi_serve_batch_size_count") >= 1
    changed = metric(text, "posi_serve_rewrites_total", changed="true")
    unchanged = metric(text, "posi_serve_rewrites_total", changed="false")
    assert changed + unchanged >= 1
    assert metric(text, "posi_serve_jit_compilations") >= 1  # the warm-up's, counted from JAX's compile events


def test_playground_page(plain_service):
    with plain_service.client() as c:
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for needle in ('id="prompt"', 'id="rewrite"', '"/v1/rewrite"', '"/v1/images/generations"', '"/healthz"'):
        assert needle in page
    assert "<script src=" not in page  # no framework, nothing fetched from elsewhere


BIG = b'{"prompts": ["' + b"a" * (1 << 20) + b'"]}'
BAD_REWRITES = {
    "malformed JSON": (b'{"prompts": [', 400, "malformed JSON"),
    "not UTF-8": (b'{"prompts": ["caf\xe9"]}', 400, "not valid UTF-8 (byte 0xe9 at offset 17)"),
    "empty body": (b"", 400, "empty request body"),
    "not an object": (b'["a cat"]', 400, "must be a JSON object, got an array"),
    "NaN": (b'{"prompts": ["a"], "temperature": NaN}', 400, "NaN is not a JSON number"),
    "missing prompts": (b"{}", 400, "missing required field 'prompts'"),
    "prompts a string": (b'{"prompts": "a cat"}', 400, "'prompts': input should be a valid list"),
    "prompt a number": (b'{"prompts": ["a", 3]}', 400, "'prompts[1]': input should be a valid string"),
    "no prompts": (b'{"prompts": []}', 400, "no prompts given"),
    "blank prompt": (b'{"prompts": ["a", "   "]}', 400, "prompt 2: empty prompt"),
    "prompt too long": (json.dumps({"prompts": ["word " * 40]}).encode(), 400, "tokens long; this server takes at most 16"),
    "prompt far too long": (json.dumps({"prompts": ["x" * 5000]}).encode(), 400, "5000 characters long"),
    "too many prompts": (json.dumps({"prompts": ["a"] * 9}).encode(), 400, "9 prompts in one request"),
    "body over 1 MiB": (BIG, 413, "exceeds the limit of 1048576 bytes"),
    "unknown field": (b'{"prompts": ["a"], "prompt": "b"}', 400, "unknown field 'prompt'"),
    "greedy a string": (b'{"prompts": ["a"], "greedy": "yes"}', 400, "'greedy': input should be a valid boolean"),
    "integer as float": (b'{"prompts": ["a"], "max_new_tokens": 8.5}', 400, "'max_new_tokens'"),
    "bad top_p": (b'{"prompts": ["a"], "top_p": 2}', 400, "top_p must be in (0, 1]"),
    "settings not compiled": (b'{"prompts": ["a"], "temperature": 0.5}', 400, "are not served"),
}


@pytest.mark.parametrize("case", list(BAD_REWRITES))
def test_bad_rewrite_requests_get_openai_errors(plain_service, case):
    body, status, message = BAD_REWRITES[case]
    with plain_service.client() as c:
        r = c.post("/v1/rewrite", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


BAD_IMAGES = {
    "missing prompt": (b'{"n": 1}', 400, "missing required field 'prompt'"),
    "prompt a list": (b'{"prompt": ["a"]}', 400, "'prompt': input should be a valid string"),
    "n zero": (b'{"prompt": "a", "n": 0}', 400, "'n': input should be greater than or equal to 1"),
    "n a string": (b'{"prompt": "a", "n": "2"}', 400, "'n': input should be a valid integer"),
    "bad format": (b'{"prompt": "a", "response_format": "png"}', 400, "'response_format'"),
    "not UTF-8": (b'{"prompt": "\xff"}', 400, "not valid UTF-8"),
    "no backend": (b'{"prompt": "a cat"}', 400, "no image backend"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_requests_get_openai_errors(plain_service, case):
    body, status, message = BAD_IMAGES[case]
    with plain_service.client() as c:
        r = c.post("/v1/images/generations", content=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_unknown_routes_and_methods_get_openai_errors(plain_service):
    with plain_service.client() as c:
        missing = c.get("/v1/chat/completions")
        wrong = c.get("/v1/rewrite")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


def test_prompts_are_logged_only_at_debug_level(plain_service, caplog):
    prompt = "a very distinctive zebra prompt"
    logger = logging.getLogger("posi_jax")
    with plain_service.client() as c:
        with caplog.at_level(logging.INFO, logger="posi_jax"):
            logger.setLevel(logging.INFO)
            assert c.post("/v1/rewrite", json={"prompts": [prompt]}).status_code == 200
        assert "POST /v1/rewrite 200" in caplog.text and "zebra" not in caplog.text
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="posi_jax"):
            logger.setLevel(logging.DEBUG)
            assert c.post("/v1/rewrite", json={"prompts": [prompt]}).status_code == 200
        logger.setLevel(logging.NOTSET)
    assert "zebra" in caplog.text
