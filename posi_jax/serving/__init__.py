"""The rewriter as an HTTP service (`python -m posi_jax.serve`): a dynamic batcher over fixed compiled shapes, an
OpenAI-compatible images endpoint that rewrites each prompt before an upstream images API or our local Stable
Diffusion draws it, Prometheus metrics and a playground page.

Modules: errors (OpenAI-style error objects), schemas (request bodies), batcher (dynamic batching), upstream (the
images proxy), local_images (local SD), metrics, app (the FastAPI routes), server (uvicorn on a bound socket)."""
