"""The HTTP routes (FastAPI): `POST /v1/rewrite`, `POST /v1/images/generations` (OpenAI's request and reply; the prompt
is rewritten first and every image carries the rewrite as `revised_prompt`), `GET /healthz`, `GET /metrics`, and the
playground page at `/`.

Every error is an OpenAI-style error object (`errors.APIError`); bodies are parsed by `schemas`; each request runs
under one deadline (`request_timeout_s`, 504 past it). With `api_key` set, /v1/* need `Authorization: Bearer <key>`
(then the upstream gets the server's own key, never the caller's header). Keys are never logged; prompts only at debug
level (the access log has method, path, status and time, never a query string or a header).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from posi_jax.errors import PosiError
from posi_jax.policy.chat import clean_response
from posi_jax.serving.batcher import DynamicBatcher, QueueFull, describe_sampling
from posi_jax.serving.errors import APIError, error_body
from posi_jax.serving.local_images import LocalImages
from posi_jax.serving.metrics import Metrics
from posi_jax.serving.schemas import ImagesRequest, RewriteRequest, read_json
from posi_jax.serving.upstream import UpstreamImages

log = logging.getLogger("posi_jax.serve")

ROUTES = ("/", "/healthz", "/metrics", "/v1/rewrite", "/v1/images/generations")


@dataclass(frozen=True)
class ServiceConfig:
    api_key: str | None = None  # required on /v1/* when set
    request_timeout_s: float = 60.0
    max_prompts: int = 32  # per /v1/rewrite request
    rewriter: str = "SmolLM2-135M-Instruct + POSI adapter"  # what /healthz says is loaded

    def __post_init__(self):
        if not self.request_timeout_s > 0:
            raise PosiError(f"the request timeout must be > 0 s, got {self.request_timeout_s}")
        if self.max_prompts < 1:
            raise PosiError(f"max prompts per request must be >= 1, got {self.max_prompts}")
        if self.api_key is not None and (not self.api_key.strip() or any(ord(c) < 33 for c in self.api_key)):
            raise PosiError("--api-key must be non-empty, without spaces or control characters")


def playground_html() -> str:
    return resources.files("posi_jax").joinpath("assets/playground/index.html").read_text(encoding="utf-8")


def build_app(batcher: DynamicBatcher, images: UpstreamImages | LocalImages | None, metrics: Metrics,
              config: ServiceConfig) -> FastAPI:
    page = playground_html()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if images is not None:
            await images.start()
        try:
            yield
        finally:  # uvicorn has drained the in-flight requests by now
            await batcher.close()
            if images is not None:
                await images.close()

    app = FastAPI(title="posi_jax rewriter", lifespan=lifespan)
    app.add_middleware(AccessLog, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(e).__name__)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def within_deadline(awaitable):
        try:
            async with asyncio.timeout(config.request_timeout_s):
                return await awaitable
        except TimeoutError:
            raise APIError(504, f"the request did not finish within {config.request_timeout_s:g} s",
                           code="timeout") from None
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None

    def checked_prompts(prompts, param: str) -> list[str]:
        try:
            return batcher.check(prompts)
        except PosiError as e:
            raise APIError(400, str(e), param=param, code="invalid_prompt") from None

    def count_rewrite(original: str, rewritten: str) -> bool:
        changed = clean_response(original) != rewritten
        metrics.rewrites.labels("true" if changed else "false").inc()
        log.debug("rewrite %r -> %r", original, rewritten)
        return changed

    def rejected(e: APIError) -> None:
        if e.code == "queue_full":
            metrics.rejected.labels("queue_full").inc()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "rewriter": config.rewriter, "api_key_required": config.api_key is not None,
                "images": images.describe() if images is not None else None,
                "batch_sizes": list(batcher.config.batch_sizes), "prompt_lengths": list(batcher.lengths),
                "max_prompt_tokens": batcher.config.max_prompt_tokens, "max_prompts": config.max_prompts,
                "sampling": [describe_sampling(s) for s in batcher.sampling], "queued": batcher.queued,
                "compilations_after_warmup": metrics.after_warmup()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/rewrite", openapi_extra=_body_schema(RewriteRequest))
    async def rewrite(request: Request):
        check_auth(request)
        body = await read_json(request, RewriteRequest)
        try:
            sampling = batcher.sampling_for(body.sampling_overrides())
        except PosiError as e:
            raise APIError(400, str(e), code="unsupported_sampling") from None
        if len(body.prompts) > config.max_prompts:
            raise APIError(400, f"{len(body.prompts)} prompts in one request; this server takes at most "
                                f"{config.max_prompts}", param="prompts", code="too_many_prompts")
        prompts = checked_prompts(body.prompts, "prompts")
        try:
            results = await within_deadline(batcher.rewrite(prompts, sampling))
        except APIError as e:
            rejected(e)
            raise
        return {"rewrites": [{"prompt": r.original, "rewrite": r.rewritten,
                              "changed": count_rewrite(r.original, r.rewritten), "new_tokens": r.new_tokens,
                              # accepted / proposed prompt-lookup draft tokens (null: nothing was drafted)
                              "draft_acceptance": r.acceptance_rate} for r in results],
                "sampling": describe_sampling(sampling)}

    @app.post("/v1/images/generations", openapi_extra=_body_schema(ImagesRequest))
    async def images_generations(request: Request):
        check_auth(request)
        body = await read_json(request, ImagesRequest)
        if images is None:
            raise APIError(400, "this server has no image backend: start it with --upstream URL or --sd FOLDER",
                           code="no_image_backend")
        n = body.n or 1
        size = images.check(n, body.size, body.response_format) if isinstance(images, LocalImages) else None
        prompt = checked_prompts([body.prompt], "prompt")[0]
        # with our own key required, the caller's header is ours: the upstream gets the server's key instead
        forward_auth = None if config.api_key is not None else request.headers.get("authorization")
        deadline = time.monotonic() + config.request_timeout_s

        async def rewrite_then_draw():
            [result] = await batcher.rewrite([prompt], batcher.default_sampling)
            rewritten = result.rewritten
            count_rewrite(prompt, rewritten)
            if not rewritten:
                raise APIError(422, "the rewriter produced an empty prompt; nothing was sent to the image backend",
                               code="empty_rewrite")
            if isinstance(images, LocalImages):
                reply = {"created": int(time.time()),
                         "data": [{"b64_json": b} for b in await images.generate(rewritten, n, size)]}
            else:
                reply = await images.generate({**body.model_dump(exclude_none=True), "prompt": rewritten},
                                              forward_auth, deadline)
            for image in reply["data"]:
                if image.get("revised_prompt") not in (None, rewritten):  # the upstream revised it again
                    image["upstream_revised_prompt"] = image["revised_prompt"]
                image["revised_prompt"] = rewritten
            metrics.images.labels(images.kind).inc(len(reply["data"]))
            return reply

        try:
            return await within_deadline(rewrite_then_draw())
        except APIError as e:
            rejected(e)
            raise

    return app


def _body_schema(model) -> dict:
    """The OpenAPI request body of a route that parses its body itself (to answer bad bytes with OpenAI errors)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


class AccessLog:
    """ASGI middleware: one INFO line and the request metrics per HTTP request (method, path, status, time)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - t0
            path = scope["path"]
            endpoint = path if path in ROUTES else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            log.info("%s %s %d %.0f ms", scope["method"], path if endpoint != "other" else "(other)", status[0],
                     seconds * 1000)
