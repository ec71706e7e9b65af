"""Services on loopback for the serving tests: the real app on a real uvicorn server (in a thread, so the tiny
rewriter's compiled shapes are shared), over the tiny random LLaMA (random rewrites, real shapes and batching)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from posi_jax.policy.sampler import SamplingConfig
from posi_jax.serving.batcher import BatchingConfig

# one prompt layout (the shared 36-token template and instruction, then <= 16 prompt tokens and the assistant header
# padded to 32) x two batch sizes: two compiled shapes
TINY_BATCHING = BatchingConfig(batch_sizes=(1, 4), max_wait_ms=200, max_queue=64, max_prompt_tokens=16)
TINY_SAMPLING = SamplingConfig(max_new_tokens=8)
TINY_GREEDY = SamplingConfig(max_new_tokens=8, greedy=True)


@dataclass
class Service:
    url: str
    server: object
    batcher: object
    metrics: object

    def client(self, **kwargs):
        import httpx2

        return httpx2.Client(base_url=self.url, timeout=60, **kwargs)


def start_service(rewriter, *, images=None, batching=TINY_BATCHING, sampling=(TINY_SAMPLING, TINY_GREEDY),
                  **service) -> Service:
    """`images`: None or a function of the service's Metrics that returns the image backend."""
    from posi_jax.serving.app import ServiceConfig, build_app
    from posi_jax.serving.batcher import DynamicBatcher
    from posi_jax.serving.metrics import Metrics, count_compilations
    from posi_jax.serving.server import BackgroundServer, bind

    count_compilations()
    metrics = Metrics(batching.batch_sizes)
    batcher = DynamicBatcher(rewriter, sampling, batching, metrics)
    batcher.warm_up()
    app = build_app(batcher, images(metrics) if images is not None else None, metrics, ServiceConfig(**service))
    server = BackgroundServer(app, bind("127.0.0.1", 0)).start()
    return Service(server.url, server, batcher, metrics)


@pytest.fixture(scope="session")
def tiny_rewriter(tiny_llama_folder):
    from posi_jax.policy.rewriter import Rewriter

    return Rewriter.load(str(tiny_llama_folder), max_prompt_tokens=TINY_BATCHING.max_prompt_tokens,
                         batch_size=TINY_BATCHING.max_batch)


@pytest.fixture(scope="module")
def plain_service(tiny_rewriter):
    """No image backend, no key: the default sampling settings and a greedy variant. Module-scoped: no server thread
    outlives the serving tests into the rest of the suite."""
    service = start_service(tiny_rewriter, max_prompts=8)
    yield service
    service.server.stop()


@pytest.fixture(scope="module")
def fake_images():
    """The loopback fake OpenAI server (tests/fake_openai_server.py) for the images proxy, one per test module."""
    from tests.fake_openai_server import FakeOpenAI

    server = FakeOpenAI().start()
    yield server
    server.stop()


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
