"""The one retry policy for OpenAI-compatible servers, as the serving proxy reads it from raw HTTP replies and httpx2
errors (the openai client's exceptions go through the same `classify_status`)."""
from __future__ import annotations

import httpx2
import pytest

from posi_jax.data import openai_compat


@pytest.mark.parametrize("status, kind, label", [
    (401, "auth", "auth"), (403, "auth", "auth"), (404, "not_found", "not_found"),
    (408, "retry", "http_408"), (409, "retry", "http_409"), (429, "retry", "http_429"),
    (500, "retry", "http_500"), (503, "retry", "http_503"), (400, "rejected", "http_400"),
    (422, "rejected", "http_422"),
])
def test_classify_status(status, kind, label):
    failure = openai_compat.classify_status(status, "m", {"retry-after": "3"})
    assert (failure.kind, failure.label, failure.status) == (kind, label, status)
    assert failure.retry_after == (3.0 if kind == "retry" else None)


def test_safety_refusals_from_the_error_object_or_the_whole_reply():
    coded = {"error": {"message": "no", "code": "content_policy_violation"}}
    assert openai_compat.classify_status(400, "no", None, coded).safety
    assert openai_compat.classify_status(400, "no", None, coded["error"]).safety
    assert openai_compat.classify_status(400, "Rejected by our safety system", None, None).safety
    assert not openai_compat.classify_status(400, "bad size", None, {"error": {"code": "invalid_size"}}).safety


def test_classify_transport():
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/images/generations")
    timeout = openai_compat.classify(httpx2.ReadTimeout("slow", request=request))
    refused = openai_compat.classify(httpx2.ConnectError("refused", request=request))
    dropped = openai_compat.classify(httpx2.RemoteProtocolError("closed", request=request))
    assert (timeout.kind, timeout.label) == ("retry", "timeout")
    assert (refused.kind, refused.label, refused.connection) == ("retry", "connection", True)
    assert (dropped.kind, dropped.label, dropped.connection) == ("retry", "connection", False)
    assert openai_compat.classify(ValueError("our own bug")) is None
