"""Under load and at shutdown: a full queue answers 503 with Retry-After before any work, a request past its timeout
answers 504 and its prompts leave the queue unrun, and stopping the server lets in-flight requests finish."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from posi_jax.serving.batcher import BatchingConfig
from tests.serving.conftest import TINY_GREEDY, metric, start_service

pytestmark = pytest.mark.slow

# a lone prompt waits 3 s for company, longer than the 1 s timeout: only a full batch (4 prompts) runs
SLOW_GATHER = BatchingConfig(batch_sizes=(1, 4), max_wait_ms=3000, max_queue=4, max_prompt_tokens=16)


@pytest.fixture(scope="module")
def tight(tiny_rewriter):
    # greedy: a full batch takes well under the timeout even on a busy machine (top-p sorts the vocabulary each step)
    service = start_service(tiny_rewriter, batching=SLOW_GATHER, sampling=(TINY_GREEDY,), request_timeout_s=1.0)
    yield service
    service.server.stop()


def test_a_request_past_its_timeout_gets_504_and_its_prompts_never_run(tight):
    with tight.client() as c:
        before = c.get("/metrics").text
        t0 = time.monotonic()
        r = c.post("/v1/rewrite", json={"prompts": ["a cat"]})
        waited = time.monotonic() - t0
        after = c.get("/metrics").text
        queued = c.get("/healthz").json()["queued"]
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout" and 0.9 < waited < 2.5
    assert queued == 0
    time.sleep(2.5)  # past the gathering window: the withdrawn prompt must not have run
    with tight.client() as c:
        later = c.get("/metrics").text
    assert metric(after, "posi_serve_batch_size_count") == metric(before, "posi_serve_batch_size_count")
    assert metric(later, "posi_serve_batch_size_count") == metric(before, "posi_serve_batch_size_count")


def test_a_full_batch_runs_at_once(tight):
    with tight.client() as c:
        r = c.post("/v1/rewrite", json={"prompts": ["a", "b", "c", "d"]})
    assert r.status_code == 200 and len(r.json()["rewrites"]) == 4


def test_a_full_queue_answers_503_with_retry_after(tight):
    with tight.client() as c, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(c.post, "/v1/rewrite", json={"prompts": ["a cat"]})  # gathers, then times out
        deadline = time.monotonic() + 0.9
        while c.get("/healthz").json()["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/rewrite", json={"prompts": ["a", "b", "c", "d"]})  # 1 + 4 > the queue's 4
        metrics = c.get("/metrics").text
        assert waiting.result().status_code == 504
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
    assert metric(metrics, "posi_serve_rejected_total", reason="queue_full") >= 1


def test_stopping_the_server_drains_in_flight_requests(tiny_rewriter, fake_images):
    import httpx2

    from posi_jax.serving.upstream import UpstreamImages

    fake_images.script({})
    fake_images.delay_s = 1.0  # every upstream answer takes a second
    service = start_service(tiny_rewriter, images=lambda m: UpstreamImages(fake_images.base_url, server_key="k",
                                                                           timeout_s=5, metrics=m))
    try:
        with service.client() as c, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(c.post, "/v1/images/generations", json={"prompt": "a cat"})
            deadline = time.monotonic() + 10
            while fake_images.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            stopper = threading.Thread(target=service.server.stop)
            stopper.start()
            time.sleep(0.3)
            with pytest.raises(httpx2.ConnectError):  # no new connections once draining
                httpx2.get(service.url + "/healthz", timeout=2)
            r = in_flight.result()
            stopper.join()
    finally:
        fake_images.delay_s = 0.0
        service.server.stop()
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_batches_above_the_prompt_lookup_limit_decode_without_drafts():
    from posi_jax.errors import PosiError
    from posi_jax.policy.sampler import SamplingConfig

    config = BatchingConfig(batch_sizes=(1, 8, 32), prompt_lookup_max_batch=8)
    served = SamplingConfig(prompt_lookup_tokens=10)
    assert config.decoding(served, 1) == served and config.decoding(served, 8) == served
    assert config.decoding(served, 32) == SamplingConfig(prompt_lookup_tokens=0)
    assert BatchingConfig(prompt_lookup_max_batch=0).decoding(served, 1).prompt_lookup_tokens == 0
    with pytest.raises(PosiError, match="prompt lookup max batch"):
        BatchingConfig(prompt_lookup_max_batch=-1)
