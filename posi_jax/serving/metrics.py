"""What the service measures, as Prometheus metrics in a registry of its own (several servers can share a process),
and the count of XLA compilations, taken from JAX's own compile events so "no recompilation under load" is measured,
not assumed."""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# the duration event JAX records for every backend (XLA) compilation, whatever function triggered it
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_lock = threading.Lock()
_compilations = 0
_listening = False

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


def compilations() -> int:
    """XLA compilations in this process since `count_compilations` was first called."""
    with _compile_lock:
        return _compilations


def count_compilations() -> None:
    """Start counting JAX's backend compilations (idempotent; JAX has no way to unregister a listener)."""
    global _listening
    import jax

    with _compile_lock:
        if _listening:
            return
        _listening = True

    def listener(event: str, duration_s: float, **kwargs) -> None:
        global _compilations
        if event == _COMPILE_EVENT:
            with _compile_lock:
                _compilations += 1

    jax.monitoring.register_event_duration_secs_listener(listener)


class Metrics:
    def __init__(self, batch_sizes: tuple[int, ...]):
        disable_created_metrics()  # the *_created series double the text for nothing a dashboard uses
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("posi_serve_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("posi_serve_request_seconds", "Time to answer a request", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("posi_serve_batch_size", "Prompts in each rewriter batch (before padding)",
                                    buckets=tuple(float(b) for b in batch_sizes), registry=r)
        self.batch_seconds = Histogram("posi_serve_batch_seconds", "Wall time of each rewriter batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.padded_rows = Counter("posi_serve_padded_rows", "Rows added to fill a batch up to its compiled size",
                                   registry=r)
        self.rewrites = Counter("posi_serve_rewrites", "Prompts rewritten", ["changed"], registry=r)
        self.queue_depth = Gauge("posi_serve_queue_depth", "Prompts waiting for a batch", registry=r)
        self.rejected = Counter("posi_serve_rejected", "Requests refused before any work", ["reason"], registry=r)
        self.upstream_errors = Counter("posi_serve_upstream_errors", "Failed attempts at the upstream images API",
                                       ["kind"], registry=r)
        self.images = Counter("posi_serve_images", "Images returned", ["backend"], registry=r)
        self.compilations = Gauge("posi_serve_jit_compilations", "XLA compilations in this process", registry=r)
        self.compilations.set_function(compilations)
        self.compilations_after_warmup = Gauge("posi_serve_jit_compilations_after_warmup",
                                               "XLA compilations since the warm-up ended (0 under any load)",
                                               registry=r)
        self._at_warmup = None
        self.compilations_after_warmup.set_function(self.after_warmup)

    def warmed_up(self) -> None:
        self._at_warmup = compilations()

    def after_warmup(self) -> int:
        return 0 if self._at_warmup is None else compilations() - self._at_warmup

    def text(self) -> bytes:
        return generate_latest(self.registry)
