"""The one home of talking to OpenAI-compatible servers (chat completions for the pair builder, images for the
evaluation's black-box mode and the serving proxy): the API key and base URL, error classification, Retry-After and
backoff.

The key is read in one place (`api_key`): surrounding whitespace (a CR/LF from a file saved on Windows) is stripped,
a key with any other character outside printable ASCII is refused (without showing it), and every message taken from
the client or the server (`classify`) has the key removed (`redact`) before it is shown or written.
"""
from __future__ import annotations

import dataclasses
import email.utils
import os
import random
import re
import time
from typing import Callable

from posi_jax.errors import PosiError


def api_key(explicit: str | None = None) -> str:
    """The API key: `explicit`, else $OPENAI_API_KEY; stripped of surrounding whitespace; never empty."""
    raw = explicit if explicit is not None else os.environ.get("OPENAI_API_KEY", "")
    key = raw.strip()
    if not key:
        raise PosiError("no API key: set OPENAI_API_KEY (any non-empty value for a local server that ignores it)")
    if any(not 33 <= ord(c) <= 126 for c in key):  # an HTTP header value; httpx would quote it in its error
        raise PosiError("the API key contains spaces, control characters or non-ASCII characters (is it the whole "
                        "file, or two keys on two lines?); set OPENAI_API_KEY to the key alone")
    return key


def redact(text: str, key: str | None) -> str:
    """`text` with every occurrence of the key replaced by a marker."""
    return text.replace(key, "[API key redacted]") if key else text


def base_url(explicit: str | None = None) -> str | None:
    """The server: `explicit`, else $OPENAI_BASE_URL, else None (the client's default, api.openai.com)."""
    url = explicit or os.environ.get("OPENAI_BASE_URL") or None
    if url is not None:
        url = url.strip()
        if not re.match(r"^https?://[^\s/]+", url):
            raise PosiError(f"base URL must start with http:// or https:// and name a host, got {url!r}")
    return url


@dataclasses.dataclass(frozen=True)
class APIFailure:
    """What an exception from the openai client means for the caller.

    kind: "retry" (timeout, dropped connection, 408/409/429/5xx, a reply that is not the expected JSON), "auth" (401/403:
    stops the run), "not_found" (404: wrong model or URL, stops the run), "rejected" (another 4xx: this request is
    refused, e.g. by a content filter)."""

    kind: str
    label: str  # short name for logs: timeout | connection | http_<status> | malformed | auth | not_found
    detail: str
    status: int | None = None
    retry_after: float | None = None
    connection: bool = False  # the server could not be reached at all
    safety: bool = False  # a 4xx whose code or message says the provider's safety system refused it


def classify(error: BaseException, key: str | None = None) -> APIFailure | None:
    """The APIFailure of an openai client exception or of an httpx2 transport error (the serving proxy calls httpx2
    directly), its texts without `key` (the API key); None for any other exception (the caller's own bug)."""
    failure = _classify(error)
    return None if failure is None else dataclasses.replace(failure, detail=redact(failure.detail, key))


def _classify(error: BaseException) -> APIFailure | None:
    import openai

    if isinstance(error, openai.APITimeoutError):
        return APIFailure("retry", "timeout", "no reply within the timeout")
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error
        return APIFailure("retry", "connection", f"{type(cause).__name__}: {cause}", connection=True)
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(getattr(error, "body", None), dict) else None
        return classify_status(error.status_code, error.message, error.response.headers, body)
    if isinstance(error, openai.APIResponseValidationError):
        return APIFailure("retry", "malformed", f"{type(error).__name__}: {error}")
    return classify_transport(error)


def classify_status(status: int, message: str, headers=None, body: dict | None = None) -> APIFailure:
    """The APIFailure of an HTTP error reply: 401/403 auth, 404 not_found, 408/409/429/5xx retry (with the
    server's Retry-After), any other 4xx rejected (`safety` when the provider's safety system refused it)."""
    if status in (401, 403):
        return APIFailure("auth", "auth", message, status=status)
    if status == 404:
        return APIFailure("not_found", "not_found", message, status=status)
    if status in (408, 409, 429) or status >= 500:
        return APIFailure("retry", f"http_{status}", message, status=status, retry_after=parse_retry_after(headers))
    return APIFailure("rejected", f"http_{status}", message, status=status, safety=is_safety_refusal(body, message))


def classify_transport(error: BaseException) -> APIFailure | None:
    """The APIFailure of an httpx2 exception raised before any reply (timeout, refused or dropped connection)."""
    import httpx2

    if isinstance(error, httpx2.TimeoutException):
        return APIFailure("retry", "timeout", "no reply within the timeout")
    if isinstance(error, httpx2.TransportError):
        return APIFailure("retry", "connection", f"{type(error).__name__}: {error}",
                          connection=isinstance(error, httpx2.ConnectError))
    return None


def stop_message(failure: APIFailure, url: str, model: str, flags: str) -> str | None:
    """The message that stops a run for an `auth` or `not_found` failure (None for the others); `flags` names the
    command's options to check."""
    if failure.kind == "auth":
        return f"{url} refused the API key (HTTP {failure.status}): {failure.detail}"
    if failure.kind == "not_found":
        return f"{url}: HTTP 404 for model '{model}' ({failure.detail}); check {flags}"
    return None


def is_safety_refusal(body: dict | None, message: str) -> bool:
    """Whether a 4xx reply's OpenAI-style error (`body`: the `error` object or the whole reply) or its message says
    the provider's safety system refused the request."""
    body = body if isinstance(body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    code = str(error.get("code") or "")
    return "content_policy" in code or "safety" in code or bool(re.search(r"safety|content polic", message or "", re.I))


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date), None if absent/invalid."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after_s: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Wait before retry number `attempt` (0-based): base·2^attempt capped at max, jittered into [d/2, d] so that
    workers that failed together do not retry together; at least the server's Retry-After (itself capped at max)."""
    delay = min(max_s, base_s * 2.0 ** attempt)
    delay *= 0.5 + 0.5 * rand()
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return delay

