"""The images proxy: an OpenAI-compatible `POST {upstream}/images/generations` over httpx2 (httpx's successor, the
client openai>=3 is built on), with the retry policy of `data.openai_compat` (429 / 5xx / timeouts / dropped
connections retried with jittered backoff that honours Retry-After, within the request's deadline), other 4xx passed
back to the caller as they came, and 502 when the retries run out.

Keys: the caller's `Authorization` header is forwarded when the server does not use it for itself, else the server's
own key (OPENAI_API_KEY); neither is ever logged, and the server's key is removed from anything passed back."""
from __future__ import annotations

import asyncio
import json
import logging
import time

from posi_jax.data import openai_compat
from posi_jax.errors import PosiError
from posi_jax.serving.errors import APIError
from posi_jax.serving.metrics import Metrics

log = logging.getLogger("posi_jax.serve")


class UpstreamImages:
    kind = "upstream"

    def __init__(self, base_url: str, *, server_key: str | None, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 8.0, metrics: Metrics | None = None):
        base = openai_compat.base_url(base_url)
        if base is None:
            raise PosiError("--upstream: give the images API's base URL, e.g. https://api.openai.com/v1")
        if timeout_s <= 0 or max_retries < 0:
            raise PosiError("the upstream timeout must be > 0 and its retries >= 0")
        self.url = base.rstrip("/") + "/images/generations"
        self.server_key = server_key
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.metrics = metrics
        self._client = None

    def describe(self) -> dict:
        return {"kind": self.kind, "url": self.url}

    async def start(self) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(timeout=self.timeout_s, limits=httpx2.Limits(max_connections=64),
                                          follow_redirects=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def generate(self, body: dict, authorization: str | None, deadline: float) -> dict:
        """The upstream's reply (`{"created", "data": [...]}`) to `body`; APIError for anything else.
        `authorization`: the caller's header to forward, or None for the server's own key."""
        headers = {"content-type": "application/json"}
        ours = authorization is None and bool(self.server_key)
        if ours:
            authorization = f"Bearer {self.server_key}"
        if authorization is not None:
            headers["authorization"] = authorization
        caller_key = None if ours or not authorization else authorization.split(" ", 1)[-1].strip()
        failure = None
        for attempt in range(self.max_retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            failure, outcome = await self._attempt(body, headers, min(self.timeout_s, remaining))
            if failure is None:
                return outcome
            if failure.kind == "auth" and ours:  # not the caller's to fix
                raise APIError(502, f"the upstream images API refused this server's API key (HTTP {failure.status}): "
                                    f"{self._redact(failure.detail)[:200]}", code="upstream_auth")
            if failure.kind != "retry":  # the caller's own key or request (refused prompt, ...): passed back
                raise outcome
            if self.metrics is not None:
                self.metrics.upstream_errors.labels(failure.label).inc()
            # the label only: an upstream's message may quote the prompt, which is logged at debug level alone
            log.warning("upstream %s attempt %d/%d failed: %s", self.url, attempt + 1, self.max_retries + 1,
                        failure.label)
            log.debug("upstream failure detail: %s", self._redact(failure.detail[:300], caller_key))
            if attempt == self.max_retries:
                break
            delay = openai_compat.backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, failure.retry_after)
            if time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        if failure is None:
            raise APIError(504, "the request's deadline passed before the upstream images API answered",
                           code="timeout")
        if failure.status == 429:
            wait = max(1, round(failure.retry_after or self.backoff_max_s))
            raise APIError(429, f"the upstream images API is rate limiting: {self._redact(failure.detail)}",
                           type="rate_limit_error", code="upstream_rate_limited", headers={"Retry-After": str(wait)})
        raise APIError(502, f"the upstream images API failed ({failure.label}: {self._redact(failure.detail)[:200]})",
                       code="upstream_error")

    async def _attempt(self, body: dict, headers: dict, timeout_s: float):
        """(None, the reply) on success; else (failure, the APIError that passes an error reply back, or None)."""
        try:
            response = await self._client.post(self.url, json=body, headers=headers, timeout=timeout_s)
        except Exception as e:
            failure = openai_compat.classify(e)
            if failure is None:
                raise
            return failure, None
        try:
            reply = response.json()
        except ValueError:
            reply = None
        if response.status_code == 200:
            if isinstance(reply, dict) and isinstance(reply.get("data"), list) and reply["data"] and all(
                    isinstance(d, dict) and ("b64_json" in d or "url" in d) for d in reply["data"]):
                return None, reply
            return openai_compat.APIFailure("retry", "malformed",
                                            f"a 200 reply without images: {response.text[:100]!r}"), None
        error = reply.get("error") if isinstance(reply, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        message = str(message) if message else f"HTTP {response.status_code}: {response.text[:200]!r}"
        failure = openai_compat.classify_status(response.status_code, message, response.headers, reply)
        passed_headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else {}
        if isinstance(error, dict):
            passed = json.loads(self._redact(json.dumps(reply)))
        else:
            passed = None
        return failure, APIError(response.status_code, self._redact(message), code=f"upstream_{response.status_code}",
                                 headers=passed_headers, reply=passed)

    def _redact(self, text: str, caller_key: str | None = None) -> str:
        return openai_compat.redact(openai_compat.redact(text, self.server_key), caller_key)
